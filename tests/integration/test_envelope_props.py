"""Message properties carried through the queue: SMTPUTF8 (RFC 6531), BODY= (RFC 6152) and the DSN
parameters RET, ENVID, NOTIFY and ORCPT (RFC 3461), from the SMTP server through the queue file to the
SMTP client, and honoured by ktrelay's own notifications (RFC 3464). Two next hops run by the test record
the exact commands they receive: one offers SMTPUTF8, 8BITMIME and DSN, the other none of them."""
import re
import signal
import subprocess

import pytest

from conftest import BIN, SmtpConn, free_port, made_by_test
from peers import TcpPeer, read_data_lines
from test_relay import RELAY_CF, Node, wait_for


class Hop(TcpPeer):
    """A next hop on a loopback port, listening from start() to stop(): answers every command, records
    each command line exactly (UTF-8 kept), and the bodies it received. ehlo: the keywords it announces.
    A RCPT for an address that starts with "reject" gets 550."""

    def __init__(self, ehlo, port=None):
        super().__init__(port=port or free_port(), reuse_addr=True)
        self.ehlo = list(ehlo)
        self.commands = []
        self.bodies = []

    start = TcpPeer.listen
    stop = TcpPeer.close

    def session(self, conn):
        f = conn.makefile("rb")
        out = conn.makefile("wb")

        def say(text):
            out.write(text.encode() + b"\r\n")
            out.flush()

        try:
            say("220 hop.test ESMTP")
            while True:
                line = f.readline()
                if not line:
                    return
                cmd = line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
                with self.lock:
                    self.commands.append(cmd)
                verb = cmd.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    kws = ["hop.test", *self.ehlo]
                    say("\r\n".join(f"250{'-' if i + 1 < len(kws) else ' '}{k}" for i, k in enumerate(kws)))
                elif verb == "RCPT":
                    say("550 5.1.1 Recipient address rejected" if cmd[9:].startswith("reject") else "250 2.1.5 Ok")
                elif verb == "DATA":
                    say("354 go ahead")
                    body = b"".join(read_data_lines(f)[0])
                    with self.lock:
                        self.bodies.append(body)
                    say("250 2.0.0 Ok: queued as HOP1")
                elif verb == "BDAT":
                    body = f.read(int(cmd.split()[1]))
                    with self.lock:
                        self.bodies.append(body)
                    say("250 2.0.0 Ok: queued as HOP1")
                elif verb == "QUIT":
                    say("221 2.0.0 Bye")
                    return
                else:
                    say("250 2.0.0 Ok")
        except OSError:
            pass
        finally:
            conn.close()

    def mail_rcpt(self):
        """The MAIL and RCPT commands received so far, in order."""
        with self.lock:
            return [c for c in self.commands if c[:4].upper() in ("MAIL", "RCPT")]


FULL = ("PIPELINING", "SIZE 10240000", "8BITMIME", "DSN", "SMTPUTF8")
NONE = ("PIPELINING",)


@pytest.fixture
def hops():
    yield from made_by_test(Hop)


@pytest.fixture
def node(tmp_path):
    made = []

    def make(full, bare, extra=""):
        cf = (RELAY_CF + "mynetworks = 127.0.0.0/8\n"
              f"transport_maps = inline:{{ full.test=smtp:[127.0.0.1]:{full.port}, "
              f"bare.test=smtp:[127.0.0.1]:{bare.port} }}\n" + extra)
        n = Node(tmp_path / "node", cf)
        made.append(n)
        return n.start()

    yield make
    for n in made:
        if n.r and n.r.proc.poll() is None:
            n.stop()


def submit(n, mail, rcpts, body):
    """One transaction over SMTP from a permitted client: MAIL and RCPT lines as given; the queue id."""
    c = SmtpConn(n.r.port())
    c.ehlo()
    c.cmd(mail, 250)
    for r in rcpts:
        c.cmd(r, 250)
    c.cmd("DATA", 354)
    c.send(body + b".\r\n")
    reply = c.expect(250)
    c.quit()
    return re.search(r"queued as ([0-9A-F]+)", reply).group(1)


def notices(n, box="example.test/alice/"):
    return [p.read_bytes().decode(errors="replace") for p in n.r.maildir_files(box)]


ASCII_BODY = b"Subject: plain\r\nMessage-Id: <p1@example.test>\r\n\r\nbody line one\r\n"
UTF8_BODY = "Subject: Grüße\r\nMessage-Id: <u1@example.test>\r\n\r\nbody text ü\r\n".encode()


def test_server_announces_dsn_and_refuses_bad_parameters(node, hops):
    n = node(hops(FULL), hops(NONE))
    c = SmtpConn(n.r.port())
    lines = c.ehlo()
    assert lines[-5:] == ["250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250-DSN", "250-SMTPUTF8", "250 CHUNKING"]
    assert c.cmd("MAIL FROM:<alice@example.test> RET=BODY") == "501 5.5.4 Bad RET parameter syntax"
    assert c.cmd("MAIL FROM:<alice@example.test> RET=HDRS RET=FULL") == "501 5.5.4 Bad RET parameter syntax"
    assert c.cmd("MAIL FROM:<alice@example.test> ENVID=a+0Ab") == "501 5.5.4 Bad ENVID parameter syntax"
    c.cmd("MAIL FROM:<alice@example.test> RET=HDRS ENVID=x", 250)
    assert c.cmd("RCPT TO:<bob@full.test> NOTIFY=NEVER,DELAY") == "501 5.5.4 Error: Bad NOTIFY parameter syntax"
    assert c.cmd("RCPT TO:<bob@full.test> ORCPT=bob@full.test") == "501 5.5.4 Error: Bad ORCPT parameter syntax"
    c.cmd("RCPT TO:<bob@full.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;bob@full.test", 250)
    c.quit()


def test_discarded_dsn_keyword(tmp_path, hops):
    full, bare = hops(FULL), hops(NONE)
    cf = (RELAY_CF + "mynetworks = 127.0.0.0/8\nsmtpd_discard_ehlo_keywords = dsn, SMTPUTF8\n")
    n = Node(tmp_path / "node", cf).start()
    try:
        c = SmtpConn(n.r.port())
        lines = c.ehlo()
        assert "250-DSN" not in lines and "250-SMTPUTF8" not in lines and lines[-1] == "250 CHUNKING"
        assert c.cmd("MAIL FROM:<alice@example.test> RET=HDRS") == "501 5.7.1 DSN support is disabled"
        assert c.cmd("MAIL FROM:<alice@example.test> SMTPUTF8") == "555 5.5.4 Unsupported option: SMTPUTF8"
        c.cmd("MAIL FROM:<alice@example.test>", 250)
        assert c.cmd("RCPT TO:<bob@example.test> NOTIFY=NEVER") == "501 5.7.1 DSN support is disabled"
        c.quit()
    finally:
        n.stop()


def test_properties_sent_on_to_a_hop_that_offers_them(node, hops):
    full = hops(FULL).start()
    n = node(full, hops(NONE))
    qid = submit(n, "MAIL FROM:<jörg@example.org> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2B1",
                 ["RCPT TO:<bob@full.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40orig.test",
                  "RCPT TO:<carol@full.test>", "RCPT TO:<dave@full.test> NOTIFY=NEVER"], UTF8_BODY)
    assert n.wait_log(rf"{qid}: removed"), n.log()
    got = full.mail_rcpt()
    assert re.fullmatch(r"MAIL FROM:<jörg@example\.org> SIZE=\d+ BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ\+2B1",
                        got[0]), got
    assert got[1:] == ["RCPT TO:<bob@full.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40orig.test",
                       "RCPT TO:<carol@full.test> ORCPT=rfc822;carol@full.test",
                       "RCPT TO:<dave@full.test> NOTIFY=NEVER ORCPT=rfc822;dave@full.test"]
    assert "Grüße".encode() in full.bodies[0]
    # the hop offers DSN: reporting success is its job, not ktrelay's
    assert "notification" not in n.log()


def test_hop_without_extensions(node, hops):
    """SMTPUTF8 needed (UTF-8 in the envelope or the headers) and not offered: 5.6.7 bounce, nothing sent.
    SMTPUTF8 asked for but not needed: sent without it. An 8-bit body is converted to 7BIT (Postfix). DSN
    parameters are dropped; NOTIFY=SUCCESS gets ktrelay's own "relayed" notice."""
    bare = hops(NONE).start()
    n = node(hops(FULL), bare)
    q1 = submit(n, "MAIL FROM:<alice@example.test> SMTPUTF8", ["RCPT TO:<jörg@bare.test>"], ASCII_BODY)
    assert n.wait_log(rf"{q1}: to=<jörg@bare.test>, relay=127.0.0.1\[127.0.0.1\]:{bare.port}, delay=\d+, "
                      rf"dsn=5\.6\.7, status=bounced \(SMTPUTF8 is required, but was not offered by host "
                      rf"127\.0\.0\.1\[127\.0\.0\.1\]\)"), n.log()
    q2 = submit(n, "MAIL FROM:<alice@example.test> SMTPUTF8", ["RCPT TO:<bob@bare.test>"], UTF8_BODY)
    assert n.wait_log(rf"{q2}: to=<bob@bare.test>, .*dsn=5\.6\.7, status=bounced \(SMTPUTF8 is required"), n.log()
    assert bare.mail_rcpt() == []
    assert n.wait_log(rf"{q1}: sender non-delivery notification") and n.wait_log(rf"{q2}: sender non-delivery")
    q3 = submit(n, "MAIL FROM:<alice@example.test> SMTPUTF8 BODY=8BITMIME RET=FULL ENVID=E3",
                ["RCPT TO:<carol@bare.test> NOTIFY=SUCCESS ORCPT=rfc822;c+2Bx@orig.test"],
                b"Subject: plain\r\n\r\n8-bit body \xc3\xbc\r\n")
    assert n.wait_log(rf"{q3}: to=<carol@bare.test>, .*status=sent"), n.log()
    assert bare.mail_rcpt() == ["MAIL FROM:<alice@example.test>", "RCPT TO:<carol@bare.test>"]
    # the 8-bit body is converted for a hop without 8BITMIME (disable_mime_output_conversion = no)
    assert bare.bodies[0].endswith(b"\r\nSubject: plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                                   b"8-bit body =C3=BC\r\n"), bare.bodies[0]
    assert n.wait_log(rf"{q3}: sender delivery status notification: [0-9A-F]+"), n.log()
    texts = wait_for(lambda: len(notices(n)) == 3 and notices(n))
    utf8 = [t for t in texts if "SMTPUTF8 is required" in t]
    assert len(utf8) == 2
    assert all("Status: 5.6.7\r\n" in t and "Action: failed" in t for t in utf8)
    ok = [t for t in texts if "Successful Mail Delivery Report" in t]
    assert len(ok) == 1
    assert "Original-Envelope-Id: E3\r\n" in ok[0]
    assert ("Final-Recipient: rfc822; carol@bare.test\r\nOriginal-Recipient: rfc822;c+x@orig.test\r\n"
            "Action: relayed\r\nStatus: 2.0.0\r\nRemote-MTA: dns; 127.0.0.1\r\n"
            "Diagnostic-Code: smtp; 250 2.0.0 Ok: queued as HOP1\r\n") in ok[0]
    # a success notice returns the headers only
    assert "Content-Type: text/rfc822-headers" in ok[0] and "8-bit body" not in ok[0]


MIME_8BIT = ("Subject: single\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
             "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße = ok \r\n.leading dot " + "x" * 80 + "\r\n").encode()
MIME_8BIT_QP = (b"Subject: single\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe =3D ok=20\r\n"
                b".leading dot " + b"x" * 62 + b"=\r\n" + b"x" * 18 + b"\r\n")
MULTI_HEAD = (b"Subject: multi\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"=_b1\"\r\n\r\n"
              b"preamble\r\n--=_b1\r\nContent-Type: text/plain; charset=utf-8\r\n")
MULTI_TAIL = (b"--=_b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
              b"w7w=\r\n--=_b1--\r\n")
MULTI = MULTI_HEAD + b"Content-Transfer-Encoding: 8bit\r\n\r\n\xc3\xa9t\xc3\xa9\r\n" + MULTI_TAIL
MULTI_QP = MULTI_HEAD + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9t=C3=A9\r\n" + MULTI_TAIL


def sent_body(hop, i, subject):
    """Body i as the hop received it from the Subject line on (ktrelay puts its Received: first), with
    DATA's dot-stuffing in place."""
    b = hop.bodies[i]
    return b[b.index(b"Subject: " + subject):]


def test_mime_output_conversion(node, hops):
    """disable_mime_output_conversion = no (the default, as Postfix): an 8BITMIME message to a hop without
    8BITMIME goes as quoted-printable, only in its 8-bit parts, with no BODY=; the hop with 8BITMIME gets
    the bytes as they were; an 8BITMIME message with nothing 8-bit goes unchanged."""
    full, bare = hops(FULL).start(), hops(NONE).start()
    n = node(full, bare)
    for i, (body, want, subject) in enumerate([(MIME_8BIT, MIME_8BIT_QP, b"single"), (MULTI, MULTI_QP, b"multi"),
                                               (ASCII_BODY, ASCII_BODY, b"plain")]):
        stuffed = body.replace(b"\r\n.", b"\r\n..")
        q = submit(n, "MAIL FROM:<alice@example.test> BODY=8BITMIME", ["RCPT TO:<bob@bare.test>"], stuffed)
        assert n.wait_log(rf"{q}: to=<bob@bare.test>, .*status=sent"), n.log()
        assert bare.mail_rcpt()[-2][:30] == "MAIL FROM:<alice@example.test>"
        assert "BODY=" not in bare.mail_rcpt()[-2]
        assert sent_body(bare, i, subject) == want.replace(b"\r\n.", b"\r\n.."), sent_body(bare, i, subject)
        q = submit(n, "MAIL FROM:<alice@example.test> BODY=8BITMIME", ["RCPT TO:<bob@full.test>"], stuffed)
        assert n.wait_log(rf"{q}: to=<bob@full.test>, .*status=sent"), n.log()
        assert full.mail_rcpt()[-2].endswith(" BODY=8BITMIME")
        assert sent_body(full, i, subject) == stuffed


def test_mime_output_conversion_without_body_parameter(node, hops):
    """No BODY= but 8-bit bytes: converted as well (as Postfix's cleanup marks such mail 8-bit); BODY=7BIT
    is taken at its word."""
    bare = hops(NONE).start()
    n = node(hops(FULL), bare)
    q = submit(n, "MAIL FROM:<alice@example.test>", ["RCPT TO:<bob@bare.test>"], MULTI)
    assert n.wait_log(rf"{q}: to=<bob@bare.test>, .*status=sent"), n.log()
    assert sent_body(bare, 0, b"multi") == MULTI_QP
    q = submit(n, "MAIL FROM:<alice@example.test> BODY=7BIT", ["RCPT TO:<bob@bare.test>"], MULTI)
    assert n.wait_log(rf"{q}: to=<bob@bare.test>, .*status=sent"), n.log()
    assert sent_body(bare, 1, b"multi") == MULTI
    assert bare.mail_rcpt() == ["MAIL FROM:<alice@example.test>", "RCPT TO:<bob@bare.test>"] * 2


def test_mime_output_conversion_over_bdat(node, hops):
    """A hop with CHUNKING and without 8BITMIME: BDAT states the converted body's length."""
    chunk = hops(("PIPELINING", "CHUNKING")).start()
    n = node(hops(FULL), chunk)
    q = submit(n, "MAIL FROM:<alice@example.test> BODY=8BITMIME", ["RCPT TO:<bob@bare.test>"], MULTI)
    assert n.wait_log(rf"{q}: to=<bob@bare.test>, .*status=sent"), n.log()
    assert chunk.mail_rcpt() == ["MAIL FROM:<alice@example.test>", "RCPT TO:<bob@bare.test>"]
    bdat = [c for c in chunk.commands if c.startswith("BDAT ")]
    assert bdat == [f"BDAT {len(chunk.bodies[0])} LAST"]
    assert sent_body(chunk, 0, b"multi") == MULTI_QP


def test_mime_output_conversion_disabled(node, hops):
    """disable_mime_output_conversion = yes: the 8-bit body goes to the hop without 8BITMIME as it is."""
    bare = hops(NONE).start()
    n = node(hops(FULL), bare, "disable_mime_output_conversion = yes\n")
    q = submit(n, "MAIL FROM:<alice@example.test> BODY=8BITMIME", ["RCPT TO:<bob@bare.test>"], MULTI)
    assert n.wait_log(rf"{q}: to=<bob@bare.test>, .*status=sent"), n.log()
    assert bare.mail_rcpt() == ["MAIL FROM:<alice@example.test>", "RCPT TO:<bob@bare.test>"]
    assert sent_body(bare, 0, b"multi") == MULTI


def test_notify_and_ret_in_notices(node, hops):
    """NOTIFY=NEVER: no bounce. No NOTIFY: the bounce returns the whole message; RET=HDRS: its headers
    only. ENVID and ORCPT in the delivery-status part. NOTIFY=SUCCESS on a local recipient: "delivered"."""
    full = hops(FULL).start()
    n = node(full, hops(NONE))
    q1 = submit(n, "MAIL FROM:<alice@example.test>", ["RCPT TO:<reject1@full.test> NOTIFY=NEVER"], ASCII_BODY)
    assert n.wait_log(rf"{q1}: to=<reject1@full.test>, .*status=bounced"), n.log()
    assert n.wait_log(rf"{q1}: removed")
    q2 = submit(n, "MAIL FROM:<alice@example.test> ENVID=ENV+2B2", ["RCPT TO:<reject2@full.test>"], ASCII_BODY)
    q3 = submit(n, "MAIL FROM:<alice@example.test> RET=HDRS ENVID=ENV3",
                ["RCPT TO:<reject3@full.test> NOTIFY=FAILURE ORCPT=rfc822;x+40orig.test"], ASCII_BODY)
    q4 = submit(n, "MAIL FROM:<alice@example.test>", ["RCPT TO:<bob@example.test> NOTIFY=SUCCESS"], ASCII_BODY)
    for q in (q2, q3, q4):
        assert n.wait_log(rf"{q}: removed"), n.log()
    assert not re.search(rf"{q1}: sender .*notification", n.log())
    assert n.wait_log(rf"{q4}: to=<bob@example.test>, relay=virtual, .*status=sent")
    assert n.wait_log(rf"{q4}: sender delivery status notification")
    texts = wait_for(lambda: len(notices(n)) == 3 and notices(n))
    by = {q: [t for t in texts if f"X-Ktrelay-Queue-ID: {q}\r\n" in t] for q in (q1, q2, q3, q4)}
    assert by[q1] == []
    full2, = by[q2]
    assert "Original-Envelope-Id: ENV+2\r\n" in full2
    assert "Content-Description: Undelivered Message\r\nContent-Type: message/rfc822\r\n" in full2
    assert "body line one" in full2
    hdrs3, = by[q3]
    assert "Original-Envelope-Id: ENV3\r\n" in hdrs3
    assert "Final-Recipient: rfc822; reject3@full.test\r\nOriginal-Recipient: rfc822;x@orig.test\r\n" in hdrs3
    assert "Content-Type: text/rfc822-headers" in hdrs3 and "Subject: plain" in hdrs3
    assert "body line one" not in hdrs3
    ok4, = by[q4]
    assert ("Final-Recipient: rfc822; bob@example.test\r\nOriginal-Recipient: rfc822;bob@example.test\r\n"
            "Action: delivered\r\nStatus: 2.0.0\r\n") in ok4
    assert len(n.r.maildir_files("example.test/bob/")) == 1


def test_delay_warning_follows_notify(node, hops):
    """DELAY governs the delay warning: a recipient with NOTIFY=FAILURE is left out of it."""
    full = hops(FULL)                  # not started: every attempt is deferred
    n = node(full, hops(NONE), "delay_warning_time = 1s\n")
    qid = submit(n, "MAIL FROM:<alice@example.test>",
                 ["RCPT TO:<bob@full.test> NOTIFY=FAILURE", "RCPT TO:<carol@full.test>"], ASCII_BODY)
    assert n.wait_log(rf"{qid}: sender delay notification: [0-9A-F]+"), n.log()
    warn, = wait_for(lambda: notices(n))
    assert "Final-Recipient: rfc822; carol@full.test" in warn and "Action: delayed" in warn
    assert "bob@full.test" not in warn


def test_queue_file_keeps_properties_across_kill_9(node, hops):
    full = hops(FULL)                  # down at first
    n = node(full, hops(NONE))
    qid = submit(n, "MAIL FROM:<alice@example.test> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=K9",
                 ["RCPT TO:<jörg@full.test> NOTIFY=SUCCESS,DELAY ORCPT=utf-8;jörg@orig.test"], UTF8_BODY)
    assert n.wait_log(rf"{qid}: to=<jörg@full.test>, .*status=deferred"), n.log()
    text = (n.d / "queue" / "new" / qid).read_bytes()
    env = text.split(b"body\n", 1)[0].decode()
    assert ("smtputf8 1\nencoding 8BITMIME\nret HDRS\nenvid K9\n"
            "rcpt jörg@full.test\nnotify SUCCESS,DELAY\norcpt utf-8;jörg@orig.test\n") in env
    n.stop(sig=signal.SIGKILL)
    full.start()
    n.start()
    assert n.wait_log(rf"{qid}: to=<jörg@full.test>, .*status=sent"), n.log()
    got = full.mail_rcpt()
    assert re.fullmatch(r"MAIL FROM:<alice@example\.test> SIZE=\d+ BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=K9",
                        got[0]), got
    assert got[1:] == ["RCPT TO:<jörg@full.test> NOTIFY=SUCCESS,DELAY ORCPT=utf-8;jörg@orig.test"]


def test_sendmail_dsn_options_and_pickup(node, hops):
    """sendmail -N, -R, -V as Postfix's: stored, then sent on to a hop that offers DSN; a bad value is a
    usage error. A maildrop file's DSN lines are checked like an SMTP client's parameters."""
    full = hops(FULL).start()
    n = node(full, hops(NONE))
    base = [BIN, "sendmail", "-c", str(n.d), "-f", "alice@example.test"]
    p = subprocess.run(base + ["-N", "success,sometimes", "bob@full.test"], input=ASCII_BODY, capture_output=True)
    assert p.returncode == 64 and b"bad -N option value" in p.stderr
    p = subprocess.run(base + ["-R", "body", "bob@full.test"], input=ASCII_BODY, capture_output=True)
    assert p.returncode == 64 and b"bad -R option value" in p.stderr
    p = subprocess.run(base + ["-V", "x" * 101, "bob@full.test"], input=ASCII_BODY, capture_output=True)
    assert p.returncode == 64
    p = subprocess.run(base + ["-v", "-N", "success,delay", "-R", "hdrs", "-V", "env id+1", "bob@full.test"],
                       input=ASCII_BODY, capture_output=True)
    assert p.returncode == 0, p.stderr
    qid = re.search(rb"([0-9A-F]+): from=", p.stderr).group(1).decode()
    assert n.wait_log(rf"{qid}: removed"), n.log()
    got = full.mail_rcpt()
    assert re.fullmatch(r"MAIL FROM:<alice@example\.test> SIZE=\d+ RET=HDRS ENVID=env\+20id\+2B1", got[0]), got
    assert got[1:] == ["RCPT TO:<bob@full.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;bob@full.test"]
    # what sendmail drops for the daemon's pickup, written here by hand
    drop = n.d / "queue" / "maildrop"
    assert wait_for(lambda: drop.is_dir())
    (drop / "BAD1").write_bytes(b"KTQUEUE 1\nsender alice@example.test\nrcpt carol@full.test\nenvid a+0Ab\n"
                                b"body\n" + ASCII_BODY)
    (drop / "GOOD1").write_bytes(b"KTQUEUE 1\nsender alice@example.test\nrcpt carol@full.test\nnotify NEVER\n"
                                 b"ret FULL\nenvid Q+2B\nbody\n" + ASCII_BODY)
    assert n.wait_log(r"pickup: .*/BAD1: malformed submission"), n.log()
    assert wait_for(lambda: len(full.mail_rcpt()) == 4), full.mail_rcpt()
    got = full.mail_rcpt()
    assert re.fullmatch(r"MAIL FROM:<alice@example\.test> SIZE=\d+ RET=FULL ENVID=Q\+2B", got[2]), got
    assert got[3] == "RCPT TO:<carol@full.test> NOTIFY=NEVER ORCPT=rfc822;carol@full.test"


def test_smtputf8_disabled(node, hops):
    """smtputf8_enable = no: SMTPUTF8 neither announced nor accepted, UTF-8 addresses are 8-bit data, and
    a UTF-8 message goes to a next hop without SMTPUTF8 instead of bouncing (Postfix's workaround)."""
    bare = hops(NONE).start()
    n = node(hops(FULL), bare, "smtputf8_enable = no\n")
    c = SmtpConn(n.r.port())
    assert "250-SMTPUTF8" not in c.ehlo()
    assert c.cmd("MAIL FROM:<alice@example.test> SMTPUTF8") == "555 5.5.4 Unsupported option: SMTPUTF8"
    c.quit()
    qid = submit(n, "MAIL FROM:<jörg@example.test>", ["RCPT TO:<jörg@bare.test>"], UTF8_BODY)
    assert n.wait_log(rf"{qid}: to=<jörg@bare.test>, .*status=sent"), n.log()
    assert bare.mail_rcpt() == ["MAIL FROM:<jörg@example.test>", "RCPT TO:<jörg@bare.test>"]


def test_success_notice_after_lmtp_is_delivered(tmp_path, hops):
    """LMTP is final delivery: NOTIFY=SUCCESS to an LMTP server without DSN gets "delivered", not
    "relayed" (Postfix's lmtp)."""
    lmtp = hops(()).start()            # answers LHLO with one line: no extensions
    cf = (RELAY_CF + "mynetworks = 127.0.0.0/8\n"
          f"transport_maps = inline:{{ lmtp.test=lmtp:inet:[127.0.0.1]:{lmtp.port} }}\n")
    n = Node(tmp_path / "node", cf).start()
    try:
        qid = submit(n, "MAIL FROM:<alice@example.test>", ["RCPT TO:<bob@lmtp.test> NOTIFY=SUCCESS"], ASCII_BODY)
        assert n.wait_log(rf"{qid}: sender delivery status notification"), n.log()
        assert lmtp.mail_rcpt() == ["MAIL FROM:<alice@example.test>", "RCPT TO:<bob@lmtp.test>"]
        assert lmtp.commands[0].startswith("LHLO ")
        ok, = wait_for(lambda: notices(n))
        assert "Final-Recipient: rfc822; bob@lmtp.test\r\nOriginal-Recipient: rfc822;bob@lmtp.test\r\n" \
               "Action: delivered\r\nStatus: 2.0.0\r\n" in ok
    finally:
        n.stop()
