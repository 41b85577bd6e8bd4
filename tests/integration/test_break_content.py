"""Hostile content against the header and body checks: header text copied by $n into replies, stored
headers and envelopes (folded headers bring line ends, a client chooses the bytes)."""
import re

import pytest

from conftest import SmtpConn
from peers import TcpPeer
from test_checks import box_files, msg, queue_id_of, send

HC = r"""
/^Subject: reject ([^!]*)/           REJECT bad subject $1
/^Subject: replace ([^!]*)/          REPLACE Subject: [tagged] $1
/^Subject: prepend ([^!]*)/          PREPEND X-Was: $1
/^Subject: cut ([^\t]*)/             REPLACE Subject: [cut] $1
/^X-Redirect: ([^!]*)/               REDIRECT $1
/^X-Filter: ([^!]*)/                 FILTER $1
"""


@pytest.fixture
def hostile(relay_factory, tmp_path):
    (tmp_path / "hc").write_text(HC)
    return relay_factory(f"""\
header_checks = pcre:{tmp_path}/hc
queue_run_delay = 1s
""")


def raw_reply(relay, body):
    c = SmtpConn(relay.port())
    c.ehlo("client.example.net")
    c.cmd("MAIL FROM:<sender@example.org>", 250)
    c.cmd("RCPT TO:<alice@example.test>", 250)
    c.cmd("DATA", 354)
    c.send(body.encode() + b".\r\n")
    data, c.buf = c.buf, b""
    while not data.endswith(b"\r\n"):
        chunk = c.sock.recv(4096)
        assert chunk, data
        data += chunk
    c.cmd("QUIT", 221)
    return data


def test_reject_text_from_a_folded_header_is_one_reply_line(hostile):
    data = raw_reply(hostile, msg("reject one\r\n\ttwo"))
    assert data == b"550 5.7.1 bad subject one two\r\n"
    log = hostile.log()
    assert "reject: header Subject: reject one\ttwo from unknown[127.0.0.1]" in log
    assert not re.search(r"^\ttwo", log, re.M)


def test_replace_and_prepend_with_a_folded_header_store_crlf_only(hostile):
    r = send(hostile, msg("replace one\r\n\ttwo"))
    assert queue_id_of(r), r
    r = send(hostile, msg("prepend three\r\n four"))
    assert queue_id_of(r), r
    files = sorted(box_files(hostile), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2
    first, second = (f.read_bytes() for f in files)
    assert b"\nSubject: [tagged] one\r\n\ttwo\r\n" in first
    assert b"\nX-Was: three\r\n four\r\nSubject: prepend three\r\n four\r\n" in second
    for b in (first, second):
        assert b.count(b"\n") == b.count(b"\r\n")


def test_replace_text_ending_in_a_fold_keeps_the_header_section(hostile):
    """$1 that ends at a fold's line end must not end the header section with an empty line."""
    r = send(hostile, msg("cut one\r\n\ttwo", "X-After: still a header\r\n"))
    assert queue_id_of(r), r
    [f] = box_files(hostile)
    b = f.read_bytes()
    assert b"\r\nSubject: [cut] one\r\nX-After: still a header\r\n\r\nhello\r\n" in b, b


def test_redirect_and_filter_to_odd_values_are_ignored(hostile):
    for hdr in ("X-Redirect: bob@example.test\r\n\tcarol@example.test",
                "X-Redirect: bob@example.test carol@example.test",
                "X-Filter: smtp:[127.0.0.1]:25\r\n\trcpt evil@example.net"):
        r = send(hostile, msg("plain", hdr + "\r\n"))
        assert queue_id_of(r), r
    log = hostile.log()
    assert "redirect:" not in log and "filter:" not in log, log[-3000:]
    assert len(box_files(hostile)) == 3
    assert box_files(hostile, "bob") == [] and box_files(hostile, "carol") == []


class Scripted(TcpPeer):
    """A next hop that answers each command from a script: {command word: reply}; records what it got."""

    def __init__(self, replies, greeting=b"220 scripted ESMTP\r\n"):
        super().__init__(backlog=8)
        self.replies = replies
        self.greeting = greeting
        self.got = []
        self.listen()

    def session(self, s):
        f = s.makefile("rb")
        try:
            s.sendall(self.greeting)
            in_data = False
            for line in f:
                self.got.append(line)
                if in_data:
                    if line == b".\r\n":
                        in_data = False
                        s.sendall(self.replies.get(".", b"250 2.0.0 Ok\r\n"))
                    continue
                word = line.split(b" ")[0].split(b":")[0].strip().upper().decode()
                s.sendall(self.replies.get(word, b"250 Ok\r\n"))
                if word == "DATA" and self.replies.get(word, b"").startswith(b"354"):
                    in_data = True
                if word == "QUIT":
                    break
        except OSError:
            pass
        finally:
            s.close()


def test_a_2xx_reply_to_data_is_no_delivery(relay_factory, tmp_path):
    """A next hop that answers DATA with 250 (no 354) never saw the message: it stays queued, deferred."""
    srv = Scripted({"EHLO": b"250-scripted\r\n250 PIPELINING\r\n", "DATA": b"250 2.0.0 Ok\r\n"})
    r = relay_factory(f"""\
relayhost = [127.0.0.1]:{srv.port}
queue_run_delay = 300s
mynetworks = 127.0.0.0/8
""")
    c = SmtpConn(r.port())
    c.ehlo("client.example.net")
    c.cmd("MAIL FROM:<sender@example.org>", 250)
    c.cmd("RCPT TO:<bob@remote.example>", 250)
    c.cmd("DATA", 354)
    c.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
    qid = queue_id_of(c.reply())
    c.cmd("QUIT", 221)
    assert r.wait_log(f"{qid}: to=<bob@remote.example>", timeout=20), r.log()[-3000:]
    log = r.log()
    assert "status=sent" not in log, log[-3000:]
    assert re.search(rf"{qid}: to=<bob@remote.example>, relay=127.0.0.1\[127.0.0.1\]:{srv.port}, .*dsn=4\.\d\.\d, "
                     r"status=deferred \(host 127.0.0.1\[127.0.0.1\]:\d+ said: 250 2.0.0 Ok \(in reply to DATA command\)\)",
                     log), log[-3000:]
    assert f"{qid}: removed" not in log
    srv.close()


def test_an_lmtp_server_with_more_replies_than_recipients(relay_factory):
    """One end-of-data reply too many: that recipient's outcome is the first, and the connection (whose
    next reply would answer the wrong command) is not reused: the next message is delivered on a new one
    at once."""
    srv = Scripted({"LHLO": b"250-scripted\r\n250 PIPELINING\r\n", "DATA": b"354 go\r\n",
                    ".": b"250 2.0.0 <alice@example.test> Saved\r\n250 2.0.0 <alice@example.test> Saved again\r\n"},
                   greeting=b"220 scripted LMTP\r\n")
    r = relay_factory(f"""\
virtual_transport = lmtp:inet:127.0.0.1:{srv.port}
queue_run_delay = 300s
""")
    qids = []
    for i in range(2):
        c = SmtpConn(r.port())
        c.ehlo("client.example.net")
        c.cmd("MAIL FROM:<sender@example.org>", 250)
        c.cmd("RCPT TO:<alice@example.test>", 250)
        c.cmd("DATA", 354)
        c.send(f"Subject: {i}\r\n\r\nhello\r\n.\r\n".encode())
        qids.append(queue_id_of(c.reply()))
        c.cmd("QUIT", 221)
        assert r.wait_log(f"{qids[-1]}: removed", timeout=20), r.log()[-3000:]
    log = r.log()
    for q in qids:
        assert re.search(rf"{q}: to=<alice@example.test>, relay=127.0.0.1\[127.0.0.1\]:{srv.port}, .*dsn=2.0.0, "
                         r"status=sent \(250 2.0.0 <alice@example.test> Saved\)", log), log[-3000:]
    assert "deferred" not in log
    assert sum(1 for l in srv.got if l == b".\r\n") == 2
    srv.close()


def nested_multipart(depth, boundary, inner):
    """depth multipart levels, each a part of the one above; the innermost part is `inner`."""
    b = [f"{boundary}{i}" for i in range(depth)]
    text = f'From: <sender@example.org>\r\nSubject: mime\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="{b[0]}"\r\n\r\n'
    for i in range(1, depth):
        text += f'--{b[i - 1]}\r\nContent-Type: multipart/mixed; boundary="{b[i]}"\r\n\r\n'
    text += f"--{b[-1]}\r\n{inner}\r\nbody\r\n--{b[-1]}--\r\n"
    for i in range(depth - 2, -1, -1):
        text += f"--{b[i]}--\r\n"
    return text


@pytest.mark.parametrize("depth,blen", [(1, 200), (1, 3000), (20, 10), (90, 60)],
                         ids=["boundary-200", "boundary-3000", "depth-20", "depth-90"])
def test_mime_header_checks_see_parts_behind_long_boundaries_and_deep_nesting(relay_factory, tmp_path, depth, blen):
    """Postfix tracks boundaries up to mime_boundary_length_limit (2048, longer ones compared on that
    prefix) and mime_nesting_limit (100) levels: a part cannot hide from mime_header_checks behind a
    boundary longer than RFC 2046's 70 characters or a few levels more."""
    (tmp_path / "mc").write_text("/^Content-Type: application\\/x-msdownload/ REJECT executable attachment\n")
    r = relay_factory(f"mime_header_checks = pcre:{tmp_path}/mc\n")
    bad = nested_multipart(depth, "b" * blen, "Content-Type: application/x-msdownload\r\n")
    assert send(r, bad) == "550 5.7.1 executable attachment"
    good = nested_multipart(depth, "b" * blen, "Content-Type: text/plain\r\n")
    assert queue_id_of(send(r, good))
    assert len(box_files(r)) == 1
