"""One message representation: every SMTP smuggling variant, through every way in (DATA, BDAT in one
chunk and split at the variant, `ktrelay sendmail`), checked byte for byte on every way out (a Maildir
file, and a next hop run by the test that records the raw bytes it receives, once over DATA and once
over BDAT). No way in stores a bare CR or LF and no way out sends one, so no next hop can find an end of
data that ktrelay did not mean. Also smtpd_forbid_bare_newline = reject and its exclusions, and control
characters in command arguments."""
import re
import socket
import subprocess

import pytest

from conftest import BASE_MAIN_CF, BASE_VMAILBOX, BIN, SmtpConn, made_by_test, wait_for
from peers import TcpPeer

# (name, bytes placed between "before" and "after" in the body)
VARIANTS = [
    ("CR.CRLF", b"\r.\r\n"),
    ("CR.CR", b"\r.\r"),
    ("CR.LF", b"\r.\n"),
    ("LF.LF", b"\n.\n"),
    ("LF.CRLF", b"\n.\r\n"),
    ("CRLF.LF", b"\r\n.\n"),
    ("CRLF.CR", b"\r\n.\r"),
    ("LF..LF", b"\n..\n"),
    ("CR", b"\r"),
    ("LF", b"\n"),
    ("CRLF.CR.LF", b"\r\n.\r.\n"),
]
SMUGGLED = b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@remote.test>\r\nDATA\r\nSubject: smuggled\r\n"


def body_for(variant):
    # with From:, Date: and Message-ID:, so that ktrelay sendmail adds none
    return (b"Subject: v\r\nFrom: <alice@example.test>\r\nDate: Mon, 30 Nov 2026 07:00:00 +0000\r\n"
            b"Message-ID: <v@example.test>\r\n\r\nbefore" + variant + SMUGGLED + b"after\r\n")


def canonical(body):
    """What ktrelay must store (unstuffed): bare CR and bare LF become CRLF; in DATA a dot that starts
    a line after any line end is stuffing, in BDAT and sendmail it is content."""
    out, i = bytearray(), 0
    while i < len(body):
        if body[i:i + 2] == b"\r\n":
            out += b"\r\n"
            i += 2
        elif body[i:i + 1] in (b"\r", b"\n"):
            out += b"\r\n"
            i += 1
        else:
            out += body[i:i + 1]
            i += 1
    return bytes(out)


def unstuff_lines(data):
    return re.sub(rb"(?m)(?<=\r\n)\.", b"", data) if not data.startswith(b".") else \
        unstuff_lines(b"\r\n" + data[1:])[2:]


def assert_canonical(data, what):
    assert re.search(rb"\r(?!\n)", data) is None, f"bare CR in {what}: {data!r}"
    assert re.search(rb"(?<!\r)\n", data) is None, f"bare LF in {what}: {data!r}"


class NextHop(TcpPeer):
    """A minimal SMTP server on loopback that records every byte it receives, per connection; it
    offers CHUNKING when asked. Messages are parsed strictly: DATA ends only at CRLF.CRLF."""

    def __init__(self, chunking):
        super().__init__()
        self.chunking = chunking
        self.raw = []          # raw bytes of each connection
        self.messages = []     # (envelope rcpts, body as received: stuffed for DATA)
        self.listen()

    def session(self, c):
        raw = bytearray()
        with self.lock:
            self.raw.append(raw)
        buf = bytearray()

        def fill():
            d = c.recv(65536)
            if not d:
                raise EOFError
            raw.extend(d)
            buf.extend(d)

        def line():
            while b"\r\n" not in buf:
                fill()
            i = buf.index(b"\r\n")
            ln = bytes(buf[:i])
            del buf[:i + 2]
            return ln

        try:
            c.sendall(b"220 nexthop.test ESMTP\r\n")
            rcpts, body = [], bytearray()
            while True:
                ln = line()
                verb = ln[:4].upper()
                if verb == b"EHLO":
                    c.sendall(b"250-nexthop.test\r\n250-PIPELINING\r\n" +
                              (b"250-CHUNKING\r\n" if self.chunking else b"") + b"250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    rcpts, body = [], bytearray()
                    c.sendall(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    rcpts.append(ln[8:].decode())
                    c.sendall(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    c.sendall(b"354 go\r\n")
                    while b"\r\n.\r\n" not in b"\r\n" + buf:
                        fill()
                    # j indexes the CRLF before the dot in b"\r\n" + buf: the body keeps that CRLF
                    j = (b"\r\n" + buf).index(b"\r\n.\r\n")
                    body = bytes(buf[:j])
                    del buf[:j + 3]
                    with self.lock:
                        self.messages.append((rcpts, "DATA", bytes(body)))
                    c.sendall(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"BDAT":
                    args = ln.split()
                    n = int(args[1])
                    while len(buf) < n:
                        fill()
                    body += buf[:n]
                    del buf[:n]
                    if len(args) > 2:
                        with self.lock:
                            self.messages.append((rcpts, "BDAT", bytes(body)))
                    c.sendall(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    c.sendall(b"221 Bye\r\n")
                    break
                else:
                    c.sendall(b"250 Ok\r\n")
        except (EOFError, OSError):
            pass
        finally:
            c.close()


@pytest.fixture
def nexthops():
    yield from made_by_test(NextHop)


def session(relay):
    c = SmtpConn(sock=socket.create_connection(("127.0.0.1", relay.port()), timeout=20))
    assert c.cmd("EHLO client.test").startswith("250")
    return c


def send_data(relay, rcpts, body):
    c = session(relay)
    assert c.cmd("MAIL FROM:<alice@example.test>").startswith("250")
    for r in rcpts:
        assert c.cmd(f"RCPT TO:<{r}>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    c.send(body + b".\r\n")
    r = c.reply()
    c.cmd("QUIT")
    c.close()
    return r


def send_bdat(relay, rcpts, chunks):
    c = session(relay)
    assert c.cmd("MAIL FROM:<alice@example.test>").startswith("250")
    for r in rcpts:
        assert c.cmd(f"RCPT TO:<{r}>").startswith("250")
    replies = []
    for i, ch in enumerate(chunks):
        last = b" LAST" if i == len(chunks) - 1 else b""
        c.send(b"BDAT %d%s\r\n" % (len(ch), last) + ch)
        replies.append(c.reply())
    c.cmd("QUIT")
    c.close()
    return replies


def strip_received(msg):
    """The message after the trace headers ktrelay adds (Return-Path, X-Original-To, Delivered-To, Received)."""
    i = msg.index(b"\r\nSubject: v\r\n")
    assert re.fullmatch(rb"((Return-Path|X-Original-To|Delivered-To): [^\r\n]*\r\n)*Received: .*", msg[:i], re.S), msg[:i]
    return msg[i + 2:]


@pytest.mark.parametrize("chunking", [False, True], ids=["out-DATA", "out-BDAT"])
def test_every_variant_every_path(relay_factory, nexthops, chunking):
    hop = nexthops(chunking)
    r = relay_factory(f"mynetworks = 127.0.0.0/8\nqueue_directory = {{dir}}/queue\n"
                      f"relayhost = [127.0.0.1]:{hop.port}\nqueue_run_delay = 1s\n")
    expected = {}     # remote recipient -> expected canonical body (after Received:)
    local = {}        # local-part tag -> expected body in the Maildir
    for k, (name, v) in enumerate(VARIANTS):
        body = body_for(v)
        # DATA: the client's dot-stuffing is the body as is (no line starts with a dot after CRLF)
        rcpt = f"data{k}@remote.test"
        rep = send_data(r, [rcpt, f"data{k}@localhost"], body)
        assert rep.startswith("250 2.0.0"), (name, rep)
        want = unstuff_lines(canonical(body))
        expected[rcpt] = want
        local[f"data{k}"] = want
        # BDAT: one chunk, and two chunks split inside the variant
        rcpt = f"bdat{k}@remote.test"
        reps = send_bdat(r, [rcpt], [body])
        assert reps[-1].startswith("250 2.0.0"), (name, reps)
        expected[rcpt] = canonical(body)
        rcpt = f"split{k}@remote.test"
        cut = body.index(v) + 1
        reps = send_bdat(r, [rcpt, f"split{k}@localhost"], [body[:cut], body[cut:]])
        assert reps[0].startswith("250 2.0.0 Ok: ") and reps[-1].startswith("250 2.0.0"), (name, reps)
        expected[rcpt] = canonical(body)
        local[f"split{k}"] = canonical(body)
        # ktrelay sendmail: bare CR inside a line and bare LF line ends
        rcpt = f"sendmail{k}@remote.test"
        p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), "-i", "-f", "alice@example.test", rcpt],
                           input=body, capture_output=True)
        assert p.returncode == 0, p.stderr
        expected[rcpt] = canonical(body)

    got = wait_for(lambda: len(hop.messages) >= len(expected) and hop.messages, timeout=60)
    assert got and len(got) == len(expected), (len(hop.messages), r.log()[-3000:])
    for conn in hop.raw:
        # every byte the next hop received is a canonical line
        assert_canonical(bytes(conn), "the next hop's input")
    seen = set()
    for rcpts, how, msg in got:
        assert how == ("BDAT" if chunking else "DATA")
        assert len(rcpts) == 1 and rcpts[0].startswith("<") and rcpts[0].endswith(">"), rcpts
        rcpt = rcpts[0][1:-1]
        assert rcpt in expected and rcpt not in seen, rcpt
        seen.add(rcpt)
        assert "victim" not in rcpt
        content = unstuff_lines(msg) if how == "DATA" else msg
        if how == "DATA":
            assert msg.endswith(b"\r\n")
        assert strip_received(content) == expected[rcpt], (rcpt, content)
    # the next hop saw exactly the transactions ktrelay meant: the smuggled RCPT never reached it
    assert seen == set(expected)
    # the local copies: canonical, exactly the expected bytes
    assert wait_for(lambda: len(r.maildir_files("localhost/catchall/")) == len(local), 30)
    for f in r.maildir_files("localhost/catchall/"):
        data = f.read_bytes()
        assert_canonical(data, f.name)
        assert strip_received(data) in local.values()
    assert len(r.maildir_files("localhost/catchall/")) == len(local)


def test_reject_mode_and_exclusions(relay_factory):
    r = relay_factory("smtpd_forbid_bare_newline = reject\nsmtpd_forbid_bare_newline_exclusions = 127.0.0.2\n")
    for name, v in VARIANTS:
        rep = send_data(r, ["x@localhost"], body_for(v))
        what = "LF" if b"\n" in v.replace(b"\r\n", b"") else "CR"
        assert rep == f"550 5.5.2 Error: bare <{what}> received", (name, rep)
        reps = send_bdat(r, ["x@localhost"], [body_for(v)])
        assert reps == [f"550 5.5.2 Error: bare <{what}> received"], (name, reps)
    assert r.maildir_files() == []
    # a refused chunk refuses the rest of the message too, and the session goes on
    c = session(r)
    assert c.cmd("MAIL FROM:<a@example.test>").startswith("250")
    assert c.cmd("RCPT TO:<x@localhost>").startswith("250")
    c.send(b"BDAT 3\r\na\nb")
    assert c.reply() == "550 5.5.2 Error: bare <LF> received"
    c.send(b"BDAT 3 LAST\r\nc\r\n")
    assert c.reply() == "550 5.5.2 Error: bare <LF> received"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    # a command line ending in a bare LF is refused too, and not run
    c.send(b"RSET\n")
    assert c.reply() == "550 5.5.2 Error: bare <LF> received"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    c.close()
    # an excluded client gets normalize
    c = SmtpConn(sock=socket.create_connection(("127.0.0.1", r.port()), timeout=10,
                                          source_address=("127.0.0.2", 0)))
    assert c.cmd("EHLO client.test").startswith("250")
    c.send(b"NOOP\n")
    assert c.reply() == "250 2.0.0 Ok"
    assert c.cmd("MAIL FROM:<a@example.test>").startswith("250")
    assert c.cmd("RCPT TO:<x@localhost>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: v\n\nline\n.\r\n")   # not the end: the dot follows a bare LF
    c.send(b"last\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0")
    c.close()
    files = wait_for(lambda: r.maildir_files(), 30)
    assert strip_received(files[0].read_bytes()) == b"Subject: v\r\n\r\nline\r\n\r\nlast\r\n"


def test_reject_code_and_values(relay_factory, tmp_path):
    r = relay_factory("smtpd_forbid_bare_newline = reject\nsmtpd_forbid_bare_newline_exclusions =\n"
                      "smtpd_forbid_bare_newline_reject_code = 450\n")
    assert send_data(r, ["x@localhost"], b"a\nb\r\n") == "450 4.5.2 Error: bare <LF> received"
    # "yes" is normalize; "no" is accepted with a warning and still never ends data at <LF>.<LF>
    r2 = relay_factory("smtpd_forbid_bare_newline = no\n")
    assert "smtpd_forbid_bare_newline = no" in r2.log()
    assert send_data(r2, ["y@localhost"], b"a\n.\nb\r\n").startswith("250 2.0.0")
    got = wait_for(lambda: r2.maildir_files(), 30)
    assert got[0].read_bytes().endswith(b"(UTC)\r\na\r\n\r\nb\r\n")
    for bad in ("maybe", ""):
        d = tmp_path / f"bad{bad or 'empty'}"
        d.mkdir()
        (d / "vmailbox").write_text(BASE_VMAILBOX)
        (d / "main.cf").write_text(BASE_MAIN_CF.format(dir=d) + f"smtpd_forbid_bare_newline = {bad}\n")
        (d / "master.cf").write_text("127.0.0.1:1 inet n - n - - smtpd\n")
        p = subprocess.run([BIN, "check-config", "-c", str(d)], capture_output=True, text=True)
        assert p.returncode != 0 and "smtpd_forbid_bare_newline must be" in p.stderr + p.stdout, p


@pytest.mark.parametrize("line", [
    b"RCPT TO:<x@[192.0.2.1\x00...]>",
    b"MAIL FROM:<a\x00b@example.test>",
    b"RCPT TO:<x@localhost>\x1b[2J",
    b"VRFY x\x7f",
    b"RCPT TO:<x@local\rhost>",
])
def test_control_characters_in_arguments(relay, line):
    c = session(relay)
    if line.startswith(b"RCPT"):
        assert c.cmd("MAIL FROM:<a@example.test>").startswith("250")
    c.send(line + b"\r\n")
    assert c.reply() == "501 5.5.2 Syntax error: control character in command argument"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    c.close()
    assert "192.0.2.1" not in relay.log()
