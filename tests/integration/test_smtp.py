"""The SMTP core against a real ktrelay: byte-exact Maildir delivery, PIPELINING,
CHUNKING, every error reply, SMTP smuggling, the durability contract, client
disconnects, concurrency, SIGTERM draining and SIGHUP reloads.

Most tests speak SMTP over a raw socket so that exactly the bytes under test
go on the wire; smtplib is used where a well-behaved client is wanted."""
import random
import re
import signal
import smtplib
import socket
import subprocess
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import BIN, SmtpConn, give_to_mail_owner, wait_until, after_trace


def stuff(content):
    """RFC 5321 4.5.2 transparency for DATA."""
    return re.sub(rb"(^|\r\n)\.", rb"\1..", content)


def split_received(path):
    """(Received header, rest) of a delivered file, checking the ,S= and ,W= sizes in its name."""
    data = path.read_bytes()
    m = re.search(r",S=(\d+),W=(\d+)$", path.name)
    assert m, path.name
    assert int(m.group(1)) == len(data), (path.name, len(data))
    assert int(m.group(2)) == len(data)   # stored with CRLF: the RFC 822 size is the file size
    data = after_trace(data)
    assert data.startswith(b"Received: from "), data[:200]
    i = data.index(b"\r\n") + 2
    while data[i:i + 1] in (b"\t", b" "):
        i = data.index(b"\r\n", i) + 2
    return data[:i], data[i:]


def all_files(relay, sub="new"):
    base = relay.maildir_base
    return sorted(p for p in base.glob(f"**/{sub}/*")) if base.exists() else []


def start_data(c, rcpts=("someone@localhost",), sender="sender@example.org", params=""):
    assert c.cmd("EHLO client.example.org").startswith("250-mx.example.test")
    assert c.cmd(f"MAIL FROM:<{sender}>{params}") == "250 2.1.0 Ok"
    for r in rcpts:
        assert c.cmd(f"RCPT TO:<{r}>") == "250 2.1.5 Ok"


def data_wire(c, wire):
    """DATA, then WIRE as it is (dot-stuffed and ended by the caller); returns the final reply."""
    assert c.cmd("DATA").startswith("354 ")
    c.send(wire)
    return c.reply()


def send_data(c, content, rcpts=("someone@localhost",), params=""):
    """One message with DATA; CONTENT is the unstuffed message; returns the final reply."""
    start_data(c, rcpts, params=params)
    return data_wire(c, stuff(content) + b".\r\n")


def queued(reply):
    m = re.fullmatch(r"250 2\.0\.0 Ok: queued as ([0-9A-F]+)", reply)
    assert m, reply
    return m.group(1)


def delivered_by_queue(relay, qid):
    """Mail for several recipients goes through the queue (a copy each, with its own Delivered-To:): wait
    until the queue manager has delivered every recipient and removed the queue file."""
    assert relay.wait_log(f"{qid}: removed", timeout=30), relay.log()[-3000:]


def delivered_one(relay, box="localhost/catchall/"):
    files = relay.maildir_files(box)
    assert len(files) == 1, files
    return split_received(files[0])


def assert_nothing_delivered(relay):
    assert all_files(relay, "new") == []
    assert all_files(relay, "tmp") == []


# ---- byte-exact Maildir content ----

def test_8bit_body_is_stored_byte_exact(relay):
    body8 = bytes(b for b in range(0x80, 0x100)) + "grüße, 日本語\r\n".encode()
    content = b"Subject: 8bit\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body8 + b"\tTab and  spaces  \r\n"
    c = SmtpConn(relay.port())
    qid = queued(send_data(c, content, params=" BODY=8BITMIME"))
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    received, rest = delivered_one(relay)
    assert rest == content
    assert f" with ESMTP id {qid}\r\n".encode() in received
    assert b"for <someone@localhost>;" in received
    assert b"from client.example.org (unknown [127.0.0.1])" in received


def test_dot_stuffing_is_undone(relay):
    content = (b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n..\r\n...\r\n"
               b"middle . dot\r\n. \r\nend\r\n")
    wire = stuff(content)
    assert b"\r\n..\r\n" in wire and b"\r\n...\r\n" in wire   # a lone '.' line and a '..' line on the wire
    c = SmtpConn(relay.port())
    queued(send_data(c, content))
    _, rest = delivered_one(relay)
    assert rest == content


def test_only_dotdot_line(relay):
    # a client that sends the line '..' means a line holding one '.'
    c = SmtpConn(relay.port())
    start_data(c)
    queued(data_wire(c, b"Subject: x\r\n\r\n..\r\n.\r\n"))
    _, rest = delivered_one(relay)
    assert rest == b"Subject: x\r\n\r\n.\r\n"


def test_large_message_with_data(relay):
    rng = random.Random(5)
    lines = []
    size = 0
    while size < 5 * 1024 * 1024:
        n = rng.randrange(0, 990)
        line = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz .,:;-_\xc3\xa9\xe2\x82\xac") for _ in range(n))
        if rng.random() < 0.05:
            line = b"." + line
        lines.append(line)
        size += n + 2
    content = b"Subject: big\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    c = SmtpConn(relay.port(), timeout=120)
    queued(send_data(c, content, params=" BODY=8BITMIME"))
    _, rest = delivered_one(relay)
    assert len(rest) == len(content)
    assert rest == content


def test_empty_body(relay):
    c = SmtpConn(relay.port())
    start_data(c)
    queued(data_wire(c, b".\r\n"))
    received, rest = delivered_one(relay)
    assert rest == b""


def test_smtputf8_addresses(relay):
    c = SmtpConn(relay.port())
    assert c.cmd("EHLO client.example.org").splitlines()[-1] == "250 CHUNKING"
    # a unicode address needs the SMTPUTF8 parameter
    assert c.cmd("MAIL FROM:<jörg@exämple.org>").startswith("553 5.6.7")
    assert c.cmd("MAIL FROM:<jörg@exämple.org> SMTPUTF8 BODY=8BITMIME") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<ünïcødé@localhost>") == "250 2.1.5 Ok"
    assert c.cmd("DATA").startswith("354")
    content = "From: jörg@exämple.org\r\nSubject: ünïcødé\r\n\r\nhällo\r\n".encode()
    c.send(content + b".\r\n")
    queued(c.reply())
    received, rest = delivered_one(relay)
    assert rest == content
    assert "for <ünïcødé@localhost>;".encode() in received
    assert relay.wait_log("to=<ünïcødé@localhost>, relay=virtual")


# ---- PIPELINING ----

def test_pipelined_group(relay):
    c = SmtpConn(relay.port())
    c.reads.clear()
    c.send(b"EHLO client.example.org\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<a@localhost>\r\n"
           b"RCPT TO:<postmaster@localhost>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<alice@example.test>\r\n"
           b"DATA\r\n")
    ehlo = c.reply()
    assert ehlo.startswith("250-mx.example.test\n250-PIPELINING\n")
    assert "250-CHUNKING" not in ehlo and ehlo.endswith("\n250 CHUNKING")
    assert c.reply() == "250 2.1.0 Ok"
    assert c.reply() == "250 2.1.5 Ok"
    assert c.reply() == "250 2.1.5 Ok"
    assert c.reply().startswith("550 5.1.1 <nobody@example.test>")
    assert c.reply() == "250 2.1.5 Ok"
    reads_before_354 = len(c.reads)
    assert c.reply().startswith("354 ")
    if reads_before_354 > 1:
        warnings.warn(f"replies to one pipelined group arrived in {reads_before_354} reads")
    assert c.buf == b""
    c.send(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    qid = queued(c.reply())
    assert c.reply() == "221 2.0.0 Bye"
    assert c.closed()
    delivered_by_queue(relay, qid)
    for box in ("localhost/catchall/", "localhost/postmaster/", "example.test/alice/"):
        _, rest = delivered_one(relay, box)
        assert rest == b"Subject: p\r\n\r\nbody\r\n"


def test_several_messages_pipelined_in_one_session(relay):
    c = SmtpConn(relay.port())
    assert c.cmd("EHLO client.example.org").startswith("250-")
    bodies = [f"Subject: m{i}\r\n\r\nmessage {i}\r\n".encode() for i in range(3)]
    c.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n")
    ids = []
    for i, body in enumerate(bodies):
        assert c.reply() == "250 2.1.0 Ok"
        assert c.reply() == "250 2.1.5 Ok"
        assert c.reply().startswith("354")
        # the end of one message and the next transaction in one write
        nxt = b"MAIL FROM:<s@example.org>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n" if i < 2 else b"QUIT\r\n"
        c.send(body + b".\r\n" + nxt)
        ids.append(queued(c.reply()))
    assert c.reply() == "221 2.0.0 Bye"
    assert len(set(ids)) == 3
    files = relay.maildir_files()
    assert sorted(split_received(f)[1] for f in files) == sorted(bodies)
    assert relay.wait_log("ehlo=1 mail=3 rcpt=3 data=3 quit=1 commands=11")


def test_whole_session_in_one_write_with_bdat(relay):
    c = SmtpConn(relay.port())
    m1, m2 = b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\nsecond\r\n"
    c.send(b"EHLO c.example.org\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<a@localhost>\r\nRCPT TO:<b@localhost>\r\n"
           + f"BDAT {len(m1)} LAST\r\n".encode() + m1
           + b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
           + f"BDAT {len(m2)} LAST\r\n".encode() + m2 + b"QUIT\r\n")
    assert c.reply().endswith("250 CHUNKING")
    assert [c.reply() for _ in range(3)] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok"]
    qid = queued(c.reply())
    assert [c.reply() for _ in range(2)] == ["250 2.1.0 Ok", "250 2.1.5 Ok"]
    queued(c.reply())
    assert c.reply() == "221 2.0.0 Bye"
    # a@ and b@ (both the catch-all): two recipients, a copy each through the queue
    delivered_by_queue(relay, qid)
    files = relay.maildir_files()
    assert len(files) == 2 and all(split_received(f)[1] == m1 for f in files)
    assert delivered_one(relay, "example.test/alice/")[1] == m2


# ---- BDAT ----

def test_bdat_single_last(relay):
    c = SmtpConn(relay.port())
    start_data(c)
    msg = b"Subject: bdat\r\n\r\nraw\x00bytes\rand\nbare line ends\r\n.\r\n"
    c.send(f"BDAT {len(msg)} LAST\r\n".encode() + msg)
    queued(c.reply())
    received, rest = delivered_one(relay)
    # BDAT is never unstuffed; bare line ends are stored as CRLF (smtpd_forbid_bare_newline = normalize)
    assert rest == b"Subject: bdat\r\n\r\nraw\x00bytes\r\nand\r\nbare line ends\r\n.\r\n"
    assert b" with ESMTP id " in received


def test_bdat_several_chunks_and_zero_last(relay):
    c = SmtpConn(relay.port())
    start_data(c)
    parts = [b"Subject: chunks\r\n", b"\r\n", b"one", b"two\r\n", b"x" * 70000 + b"\r\n"]
    total = 0
    for p in parts:
        total += len(p)
        c.send(f"BDAT {len(p)}\r\n".encode() + p)
        assert c.reply() == f"250 2.0.0 Ok: {total} bytes"
    queued(c.cmd("BDAT 0 LAST"))
    assert delivered_one(relay)[1] == b"".join(parts)


def test_bdat_zero_last_alone_is_an_empty_message(relay):
    c = SmtpConn(relay.port())
    start_data(c)
    queued(c.cmd("BDAT 0 LAST"))
    assert delivered_one(relay)[1] == b""


def test_bdat_chunk_pipelined_with_next_command(relay):
    c = SmtpConn(relay.port())
    start_data(c)
    c.send(b"BDAT 5\r\nhelloBDAT 7 LAST\r\n world!NOOP\r\n")
    assert c.reply() == "250 2.0.0 Ok: 5 bytes"
    queued(c.reply())
    assert c.reply() == "250 2.0.0 Ok"
    assert delivered_one(relay)[1] == b"hello world!"


def canonical(data):
    """Bare CR and bare LF stored as CRLF (smtpd_forbid_bare_newline = normalize)."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


@pytest.mark.parametrize("pause", [False, True], ids=["together", "command-first"])
def test_bdat_large_chunks(relay, pause):
    # chunks of several MB, sent with the command or after it: every byte goes through the
    # line-ending rule, whatever the chunk boundaries
    rng = random.Random(7)
    chunks = [rng.randbytes(3 * 1024 * 1024 + 17), rng.randbytes(2 * 1024 * 1024 + 5)]
    c = SmtpConn(relay.port(), timeout=120)
    start_data(c)
    total = 0
    for ch in chunks:
        total += len(ch)
        c.send(f"BDAT {len(ch)}\r\n")
        if pause:
            c.wait_read_by_server()
        c.send(ch)
        assert c.reply() == f"250 2.0.0 Ok: {total} bytes"
    queued(c.cmd("BDAT 0 LAST"))
    rest = delivered_one(relay)[1]
    want = canonical(b"".join(chunks))
    assert len(rest) == len(want)
    assert rest == want


def test_data_after_bdat_is_refused(relay):
    c = SmtpConn(relay.port())
    start_data(c)
    c.send(b"BDAT 5\r\nhello")
    assert c.reply() == "250 2.0.0 Ok: 5 bytes"
    assert c.cmd("DATA").startswith("503 5.5.1")
    # the transaction is still the BDAT one; nothing was delivered by DATA
    assert all_files(relay) == []
    queued(c.cmd("BDAT 0 LAST"))
    assert delivered_one(relay)[1] == b"hello"


@pytest.mark.parametrize("arg", ["BDAT", "BDAT abc", "BDAT 5 FIRST", "BDAT -1 LAST", "BDAT 99999999999999999999999"])
def test_bad_bdat_syntax(relay, arg):
    c = SmtpConn(relay.port())
    start_data(c)
    assert c.cmd(arg) == "501 5.5.4 Syntax: BDAT count [LAST]"
    assert c.reply().startswith("421 4.5.0 mx.example.test")
    assert c.closed()
    assert_nothing_delivered(relay)


def test_bdat_without_transaction_reads_and_discards_chunk(relay):
    c = SmtpConn(relay.port())
    assert c.cmd("EHLO c.example.org").startswith("250-")
    # the chunk's bytes look like commands: they must be read as data, not executed
    c.send(b"BDAT 24 LAST\r\nQUIT\r\nQUIT\r\nQUIT\r\nQUIT\r\n")
    assert c.reply() == "503 5.5.1 Error: need MAIL command"
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    c.send(b"BDAT 6 LAST\r\nQUIT\r\n")
    assert c.reply() == "554 5.5.1 Error: no valid recipients"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert_nothing_delivered(relay)


# ---- the end of a session ----

def test_quit_reply_arrives_before_the_end_with_more_unread(relay):
    """The 221 leaves together with the end of the stream: it must arrive even when the client sent
    more after QUIT that the server never reads, where closing the socket resets the connection and
    throws away whatever it still held."""
    c = SmtpConn(relay.port())
    c.ehlo()
    c.send(b"QUIT\r\n" + b"NOOP\r\n" * 3000)     # far more than one read of the server
    assert c.reply() == "221 2.0.0 Bye"
    assert c.closed(drain=True)
    relay.wait_log("disconnect from")


# ---- errors ----

def test_bad_sequence(relay):
    c = SmtpConn(relay.port())
    assert c.cmd("HELO client.example.org") == "250 mx.example.test"
    assert c.cmd("RCPT TO:<a@localhost>") == "503 5.5.1 Error: need MAIL command"
    assert c.cmd("DATA") == "503 5.5.1 Error: need RCPT command"
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("MAIL FROM:<a@example.org>") == "503 5.5.1 Error: nested MAIL command"
    # MAIL accepted but no recipient: Postfix's answer
    assert c.cmd("DATA") == "554 5.5.1 Error: no valid recipients"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    assert_nothing_delivered(relay)


def test_syntax_errors(relay):
    c = SmtpConn(relay.port())
    assert c.cmd("EHLO") == "501 5.5.4 Syntax: EHLO hostname"
    assert c.cmd("HELO") == "501 5.5.4 Syntax: HELO hostname"
    assert c.cmd("EHLO client.example.org").startswith("250-")
    assert c.cmd("MAIL TO:<a@example.org>") == "501 5.5.4 Syntax: MAIL FROM:<address>"
    assert c.cmd("MAIL FROM:<a b@example.org>") == "501 5.1.7 Bad sender address syntax"
    assert c.cmd("MAIL FROM:<a@example.org> SIZE=big").startswith("501 5.5.4")
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT FROM:<a@localhost>") == "501 5.5.4 Syntax: RCPT TO:<address>"
    assert c.cmd("RCPT TO:<a@@localhost>") == "501 5.1.3 Bad recipient address syntax"
    assert c.cmd("RCPT TO:<a@localhost>") == "250 2.1.5 Ok"
    assert c.cmd("DATA now") == "501 5.5.4 Syntax: DATA"
    assert c.cmd("VRFY") == "501 5.5.4 Syntax: VRFY address"


def test_unknown_command(relay):
    c = SmtpConn(relay.port())
    assert c.cmd("FROBNICATE now") == "502 5.5.2 Error: command not recognized"
    assert c.cmd("EXPN staff") == "502 5.5.1 Error: command not implemented"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    c.cmd("QUIT")
    assert relay.wait_log("noop=1 quit=1 unknown=0/1 commands=4")


def test_line_too_long_session_survives(relay):
    c = SmtpConn(relay.port())
    c.send(b"NOOP " + b"x" * 5000 + b"\r\n")
    assert c.reply() == "500 5.5.2 Error: line too long"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"     # the rest of the long line was not run as a command
    start_data(c)
    queued(send_data_only(c, b"Subject: after\r\n\r\nok\r\n"))


def send_data_only(c, content):
    return data_wire(c, stuff(content) + b".\r\n")


def test_too_many_recipients(relay_factory):
    r = relay_factory("smtpd_recipient_limit = 3\n")
    c = SmtpConn(r.port())
    start_data(c, rcpts=("a@localhost", "b@localhost", "postmaster@localhost"))
    assert c.cmd("RCPT TO:<alice@example.test>") == "452 4.5.3 Error: too many recipients"
    delivered_by_queue(r, queued(send_data_only(c, b"Subject: three\r\n\r\n")))
    assert len(r.maildir_files()) == 2          # a@ and b@ share the catch-all: a copy each
    assert len(r.maildir_files("localhost/postmaster/")) == 1
    assert r.maildir_files("example.test/alice/") == []


def test_size_over_limit_at_mail(relay_factory):
    r = relay_factory("message_size_limit = 100000\n")
    c = SmtpConn(r.port())
    ehlo = c.cmd("EHLO c.example.org")
    assert "250-SIZE 100000" in ehlo.splitlines()
    assert c.cmd("MAIL FROM:<a@example.org> SIZE=100001") == "552 5.3.4 Message size exceeds fixed limit"
    assert c.cmd("MAIL FROM:<a@example.org> SIZE=100000") == "250 2.1.0 Ok"


def test_body_over_limit_in_data(relay_factory):
    r = relay_factory("message_size_limit = 100000\n")
    c = SmtpConn(r.port())
    content = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 150
    assert send_data(c, content) == "552 5.3.4 Error: message file too big"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert_nothing_delivered(r)
    # a message under the limit still goes through in the same session
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<a@localhost>") == "250 2.1.5 Ok"
    queued(send_data_only(c, b"Subject: small\r\n\r\n"))


@pytest.mark.parametrize("chunks", [[150000], [60000, 60000], [2 * 1024 * 1024]], ids=["one", "two", "splice"])
def test_body_over_limit_in_bdat(relay_factory, chunks):
    r = relay_factory("message_size_limit = 100000\n")
    c = SmtpConn(r.port(), timeout=60)
    start_data(c)
    replies = []
    for i, n in enumerate(chunks):
        last = " LAST" if i == len(chunks) - 1 else ""
        c.send(f"BDAT {n}{last}\r\n")
        c.wait_read_by_server()
        c.send(b"z" * n)
        replies.append(c.reply())
    assert replies[-1] == "552 5.3.4 Error: message file too big"
    assert all(x.startswith("250 2.0.0 Ok: ") for x in replies[:-1]), replies
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert_nothing_delivered(r)


def test_timeout(relay_factory):
    r = relay_factory("smtpd_timeout = 2s\n")
    c = SmtpConn(r.port())
    assert c.cmd("EHLO c.example.org").startswith("250-")
    assert c.reply() == "421 4.4.2 mx.example.test Error: timeout exceeded"
    assert c.closed()
    assert r.wait_log("timeout after CONNECT from unknown[127.0.0.1]")


def test_timeout_in_data_delivers_nothing(relay_factory):
    r = relay_factory("smtpd_timeout = 2s\n")
    c = SmtpConn(r.port())
    start_data(c)
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: never finished\r\n\r\npartial")
    assert c.reply() == "421 4.4.2 mx.example.test Error: timeout exceeded"
    assert c.closed()
    assert r.wait_log("timeout after DATA")
    assert wait_until(lambda: all_files(r, "tmp") == [])
    assert all_files(r) == []


def test_hard_error_limit(relay_factory):
    r = relay_factory("smtpd_hard_error_limit = 3\n")
    c = SmtpConn(r.port())
    assert c.cmd("BOGUS1").startswith("502")
    assert c.cmd("RCPT TO:<a@localhost>").startswith("503")
    c.send(b"BOGUS3\r\nNOOP\r\n")
    assert c.reply().startswith("502")
    assert c.reply() == "421 4.7.0 mx.example.test Error: too many errors"
    assert c.closed()
    assert r.wait_log("too many errors after CONNECT from unknown[127.0.0.1]")


def test_junk_command_limit(relay_factory):
    """smtpd_junk_command_limit (Postfix): past it each HELO, EHLO, RSET, NOOP, VRFY or ETRN still gets its
    reply but also counts as an error, so a client that only repeats them meets smtpd_hard_error_limit."""
    r = relay_factory("smtpd_junk_command_limit = 2\nsmtpd_hard_error_limit = 3\n")
    c = SmtpConn(r.port())
    assert c.cmd("EHLO c.example.org").startswith("250")
    for _ in range(4):
        assert c.cmd("NOOP") == "250 2.0.0 Ok"
    c.send(b"RSET\r\n")
    assert c.reply() == "250 2.0.0 Ok"
    assert c.reply() == "421 4.7.0 mx.example.test Error: too many errors"
    assert c.closed()
    assert r.wait_log("too many errors after CONNECT from unknown[127.0.0.1]"), r.log()[-2000:]


def message_after_two_errors(c, subject):
    """One transaction: two refused recipients (two errors), one accepted, and the message received."""
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    for _ in range(2):
        assert c.cmd("RCPT TO:<nobody@remote.example>").startswith("554 5.7.1")
    assert c.cmd("RCPT TO:<someone@localhost>") == "250 2.1.5 Ok"
    queued(send_data_only(c, f"{subject}\r\n\r\nhello\r\n".encode()))


def test_errors_are_forgiven_when_a_message_is_received(relay_factory):
    """As in Postfix, a received message clears the client's error count (and its junk commands): a long
    session that delivers many messages, each with a refused recipient, is not cut at smtpd_hard_error_limit."""
    r = relay_factory("smtpd_hard_error_limit = 3\nsmtpd_junk_command_limit = 2\n")
    c = SmtpConn(r.port())
    assert c.cmd("EHLO c.example.org").startswith("250")
    for i in range(5):
        message_after_two_errors(c, f"Subject: {i}")
        assert c.cmd("NOOP") == "250 2.0.0 Ok"
        assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    assert len(r.maildir_files()) == 5


def test_a_discarded_message_also_clears_the_error_count(relay_factory, tmp_path):
    """A message header_checks DISCARD is received as far as the client and Postfix are concerned
    (CLEANUP_STAT_OK): its errors are forgiven like an accepted message's."""
    (tmp_path / "hc").write_text("/^Subject: drop/ DISCARD\n")
    r = relay_factory(f"smtpd_hard_error_limit = 3\nheader_checks = regexp:{tmp_path}/hc\n")
    c = SmtpConn(r.port())
    assert c.cmd("EHLO c.example.org").startswith("250")
    for i in range(4):
        message_after_two_errors(c, f"Subject: drop {i}")
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    assert r.maildir_files() == []


def test_junk_command_limit_below_one_is_refused(tmp_path):
    d = tmp_path / "cf"
    d.mkdir()
    (d / "main.cf").write_text(f"queue_directory = {d}/q\ndata_directory = {d}/d\nsmtpd_junk_command_limit = 0\n")
    p = subprocess.run([BIN, "check-config", "-c", str(d)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 78 and "smtpd_junk_command_limit must be at least 1" in p.stderr, p.stderr


def test_unknown_virtual_recipient_and_relay_denied(relay):
    c = SmtpConn(relay.port())
    start_data(c, rcpts=())
    assert c.cmd("RCPT TO:<carol@example.test>") == \
        "550 5.1.1 <carol@example.test>: Recipient address rejected: User unknown in virtual mailbox table"
    assert c.cmd("RCPT TO:<someone@remote.example.net>") == \
        "554 5.7.1 <someone@remote.example.net>: Relay access denied"
    assert relay.wait_log("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 <someone@remote.example.net>")
    assert c.cmd("DATA") == "554 5.5.1 Error: no valid recipients"
    assert_nothing_delivered(relay)


def test_noop_rset_vrfy_help_quit(relay):
    c = SmtpConn(relay.port())
    assert c.banner == "220 mx.example.test ESMTP ktrelay"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert c.cmd("HELP") == "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"
    assert c.cmd("VRFY <alice@example.test>") == "252 2.0.0 alice@example.test"
    assert c.cmd("VRFY anyone@localhost") == "252 2.0.0 anyone@localhost"
    assert c.cmd("VRFY carol@example.test").startswith("550 5.1.1 <carol@example.test>")
    assert c.cmd("VRFY x@remote.example.net") == "554 5.7.1 <x@remote.example.net>: Relay access denied"
    start_data(c)
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    assert c.cmd("DATA") == "503 5.5.1 Error: need RCPT command"     # RSET ended the transaction
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    assert c.closed()
    assert_nothing_delivered(relay)


# ---- SMTP smuggling ----

SMUGGLE_ENDS = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r"]


@pytest.mark.parametrize("fake_end", SMUGGLE_ENDS, ids=lambda e: e.decode().replace("\r", "CR").replace("\n", "LF"))
def test_smuggling_is_content(relay, fake_end):
    """Under the default smtpd_forbid_bare_newline = normalize a fake end of data is content: one message,
    stored as canonical lines; the smuggled commands never run (test_smuggling.py covers every path)."""
    c = SmtpConn(relay.port())
    start_data(c, rcpts=("victim@localhost",))
    assert c.cmd("DATA").startswith("354")
    smuggled = (b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nevil\r\n")
    c.send(b"Subject: innocent\r\n\r\nhello" + fake_end + smuggled + b".\r\n")
    queued(c.reply())
    # nothing else was queued as replies: the smuggled commands never ran
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    assert c.closed()
    _, rest = delivered_one(relay)
    assert rest.startswith(b"Subject: innocent\r\n\r\nhello\r\n") and rest.endswith(b"\r\nevil\r\n")
    assert b"\n" not in rest.replace(b"\r\n", b"") and b"\r" not in rest.replace(b"\r\n", b"")
    assert relay.maildir_files("example.test/alice/") == []
    assert relay.wait_log("ehlo=1 mail=1 rcpt=1 data=1 noop=1 quit=1 commands=6")


def test_bare_cr_in_body_normalized(relay):
    c = SmtpConn(relay.port())
    queued(send_data(c, b"Subject: cr\r\n\r\nhello\rworld\r\n"))
    assert delivered_one(relay)[1] == b"Subject: cr\r\n\r\nhello\r\nworld\r\n"


# ---- durability ----

def test_file_in_new_when_250_arrives(relay):
    c = SmtpConn(relay.port())
    for i in range(5):
        content = f"Subject: durable {i}\r\n\r\n".encode()
        if i:
            assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
            assert c.cmd("RCPT TO:<d@localhost>") == "250 2.1.5 Ok"
            qid = queued(send_data_only(c, content))
        else:
            qid = queued(send_data(c, content, rcpts=("d@localhost",)))
        # checked right away, with no waiting: the 250 is sent after the rename
        files = relay.maildir_files()
        assert len(files) == i + 1
        assert any(split_received(f)[1] == content for f in files)
        assert relay.wait_log(f"{qid}: to=<d@localhost>, relay=virtual")
    names = re.findall(r"delivered to maildir as (\S+)\)", relay.log())
    assert sorted(names) == sorted(f.name for f in relay.maildir_files())
    assert all_files(relay, "tmp") == []


def test_message_being_received_has_no_name_in_tmp(relay):
    """A message is spooled into an unnamed O_TMPFILE in the mailbox's tmp/ while it is received: nothing
    appears there by name (a crash leaves nothing to clean), and the file gets its one name in new/ only
    once it is complete and fsync'd."""
    c = SmtpConn(relay.port())
    start_data(c, ("d@localhost",))
    assert c.cmd("DATA").startswith("354 ")
    c.send(b"Subject: unnamed\r\n\r\nfirst part\r\n")
    wait_until(lambda: relay.open_spool_files(), 10, "the spool file")
    spool = relay.open_spool_files()
    assert len(spool) == 1 and re.fullmatch(r".*/localhost/catchall/tmp/#\d+ \(deleted\)", spool[0]), spool
    assert all_files(relay, "tmp") == [] and all_files(relay) == []
    c.send(b"second part\r\n.\r\n")
    queued(c.reply())
    assert delivered_one(relay)[1] == b"Subject: unnamed\r\n\r\nfirst part\r\nsecond part\r\n"
    assert all_files(relay, "tmp") == []
    c.close()
    wait_until(lambda: relay.open_spool_files() == [], 10, "the spool file to be closed")


def test_one_copy_per_recipient(relay):
    """As Postfix's virtual(8): each recipient gets its own copy with its own Delivered-To:, also two
    recipients of one mailbox (the catch-all); the same address twice, in any case, is one recipient."""
    c = SmtpConn(relay.port())
    rcpts = ("alice@example.test", "bob@example.test", "x@localhost", "y@localhost", "postmaster@localhost",
             "ALICE@example.test")
    content = b"Subject: many\r\n\r\nfor several mailboxes\r\n"
    delivered_by_queue(relay, queued(send_data(c, content, rcpts=rcpts)))
    boxes = {"example.test/alice/": ["alice@example.test"], "example.test/bob/": ["bob@example.test"],
             "localhost/catchall/": ["x@localhost", "y@localhost"], "localhost/postmaster/": ["postmaster@localhost"]}
    for box, want in boxes.items():
        files = relay.maildir_files(box)
        assert len(files) == len(want), (box, files)
        got = []
        for f in files:
            data = f.read_bytes()
            got.append(re.search(rb"\r\nDelivered-To: (\S+)\r\n", data).group(1).decode())
            received, rest = split_received(f)
            assert rest == content
            assert b"\tfor <" not in received          # several recipients: no single "for" clause
        assert sorted(got) == want
    assert len(all_files(relay)) == 5
    assert all_files(relay, "tmp") == []


@pytest.mark.parametrize("order", [("alice", "bob"), ("bob", "alice"), ("bob",)], ids="-".join)
def test_unwritable_mailbox_451_and_nothing_left(relay, order):
    bob = relay.maildir_base / "example.test" / "bob"
    for sub in ("tmp", "cur"):
        (bob / sub).mkdir(parents=True)
    (bob / "new").write_text("not a directory\n")      # root ignores modes: a file blocks delivery
    give_to_mail_owner(bob.parent, bob, bob / "tmp", bob / "cur", bob / "new")
    c = SmtpConn(relay.port())
    r = send_data(c, b"Subject: blocked\r\n\r\n", rcpts=[f"{u}@example.test" for u in order])
    if len(order) == 1:
        # delivered by the session: refused, nothing stored
        assert r == "451 4.3.0 Error: queue file write error"
        assert all_files(relay, "new") == []
    else:
        # several recipients go through the queue: bob's copy is deferred, alice's delivered
        qid = queued(r)
        assert relay.wait_log(f"{qid}: to=<bob@example.test>, relay=virtual", timeout=20)
        assert re.search(rf"{qid}: to=<bob@example.test>, relay=virtual, .*status=deferred", relay.log())
        assert relay.wait_log(f"{qid}: to=<alice@example.test>, relay=virtual", timeout=20)
        assert len(relay.maildir_files("example.test/alice/")) == 1
        for f in relay.maildir_files("example.test/alice/"):
            f.unlink()
    assert all_files(relay, "tmp") == []
    assert (bob / "new").read_text() == "not a directory\n"
    # the session goes on and other mail is delivered
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<alice@example.test>") == "250 2.1.5 Ok"
    queued(send_data_only(c, b"Subject: fine\r\n\r\n"))
    assert len(relay.maildir_files("example.test/alice/")) == 1


def test_disconnect_in_data_leaves_nothing(relay):
    c = SmtpConn(relay.port())
    start_data(c)
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: cut\r\n\r\n" + b"partial line\r\n" * 20000)
    c.close()
    assert relay.wait_log("disconnect from unknown[127.0.0.1]")
    assert wait_until(lambda: all_files(relay, "tmp") == [])
    assert all_files(relay, "new") == []
    c2 = SmtpConn(relay.port())
    queued(send_data(c2, b"Subject: next\r\n\r\n"))
    assert len(all_files(relay)) == 1


def test_disconnect_in_large_bdat_leaves_nothing(relay):
    c = SmtpConn(relay.port())
    start_data(c)
    c.send(b"BDAT 4000000 LAST\r\n")
    c.wait_read_by_server()
    c.send(b"q" * 1500000)
    c.close()
    assert relay.wait_log("disconnect from unknown[127.0.0.1]")
    assert wait_until(lambda: all_files(relay, "tmp") == [])
    assert all_files(relay, "new") == []
    c2 = SmtpConn(relay.port())
    queued(send_data(c2, b"Subject: next\r\n\r\n"))
    assert len(all_files(relay)) == 1


# ---- concurrency ----

def test_fifty_parallel_sessions(relay):
    port = relay.port()

    def session(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            s.ehlo("c.example.org")
            for i in range(5):
                msg = f"Subject: s{n}-m{i}\r\nMessage-ID: <{n}.{i}@example.org>\r\n\r\nbody {n} {i}\r\n"
                s.sendmail("s@example.org", [f"u{n % 7}@localhost"], msg)
        return n

    with ThreadPoolExecutor(max_workers=50) as pool:
        assert sorted(pool.map(session, range(50))) == list(range(50))
    files = relay.maildir_files()
    assert len(files) == 250
    subjects = [re.search(rb"Subject: (s\d+-m\d)\r\n", split_received(f)[1]).group(1) for f in files]
    assert len(set(subjects)) == 250
    assert all_files(relay, "tmp") == []


# ---- signals ----

def test_sigterm_finishes_transaction_and_refuses_new_connections(relay):
    c = SmtpConn(relay.port())
    start_data(c)
    relay.proc.send_signal(signal.SIGTERM)
    assert relay.wait_log("terminating on signal 15")
    # a new connection is refused or closed, never left waiting; until every
    # worker has noticed the signal (next tick) one may still be greeted
    deadline = time.time() + 5
    while True:
        try:
            with socket.create_connection(("127.0.0.1", relay.port()), timeout=3) as s2:
                try:
                    first = s2.recv(100)
                except ConnectionResetError:
                    first = b""
        except ConnectionRefusedError:
            first = b""
        except socket.timeout:
            pytest.fail("a connection after SIGTERM was accepted and left waiting")
        if not first.startswith(b"220"):
            break
        assert time.time() < deadline, "new connections are still greeted after SIGTERM"
        time.sleep(0.2)
    assert relay.proc.poll() is None
    queued(send_data_only(c, b"Subject: late\r\n\r\nsent after SIGTERM\r\n"))
    try:
        r = c.cmd("QUIT")
        assert r in ("221 2.0.0 Bye", "421 4.3.2 mx.example.test Service shutting down, closing transmission "
                                      "channel"), r
    except (EOFError, ConnectionResetError, BrokenPipeError):
        pass
    assert relay.proc.wait(timeout=15) == 0
    assert delivered_one(relay)[1] == b"Subject: late\r\n\r\nsent after SIGTERM\r\n"


def test_sigterm_closes_idle_sessions(relay):
    c = SmtpConn(relay.port())
    assert c.cmd("EHLO c.example.org").startswith("250-")
    relay.proc.send_signal(signal.SIGTERM)
    assert c.reply() == "421 4.3.2 mx.example.test Service shutting down, closing transmission channel"
    assert c.closed()
    assert relay.proc.wait(timeout=15) == 0


def banner_of(port):
    c = SmtpConn(port)
    c.cmd("QUIT")
    c.close()
    return c.banner


def test_sighup_reload(relay_factory):
    # one worker: a timeout on any session proves that this worker ran its tick
    relay = relay_factory("ktrelay_worker_threads = 1\nsmtpd_timeout = 2s\n")
    main_cf = relay.dir / "main.cf"
    original = main_cf.read_text()
    main_cf.write_text(original + "smtpd_banner = $myhostname reloaded banner\n")
    relay.proc.send_signal(signal.SIGHUP)
    assert relay.wait_log("reload: configuration reloaded")
    assert wait_until(lambda: banner_of(relay.port()) == "220 mx.example.test reloaded banner", 5)

    main_cf.write_text(original + "smtpd_banner = $myhostname broken\nsmtpd_timeout = eventually\n")
    relay.proc.send_signal(signal.SIGHUP)
    assert relay.wait_log("reload: configuration has errors; keeping the running one")
    # a session accepted now times out at a worker tick 2 s later; the tick adopts a new configuration
    # before it looks at deadlines, so a wrongly adopted one would show on the next session
    idle = SmtpConn(relay.port())
    assert idle.banner == "220 mx.example.test reloaded banner"
    assert idle.reply() == "421 4.4.2 mx.example.test Error: timeout exceeded"
    idle.close()
    assert banner_of(relay.port()) == "220 mx.example.test reloaded banner"
    c = SmtpConn(relay.port())
    queued(send_data(c, b"Subject: still running\r\n\r\n"))
    assert relay.proc.poll() is None


# ---- abandoned transactions leave no files ----

def test_rset_and_quit_after_partial_bdat_leave_nothing(relay):
    c = SmtpConn(relay.port())
    start_data(c)
    c.send(b"BDAT 6\r\npart 1")
    assert c.reply() == "250 2.0.0 Ok: 6 bytes"
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    assert c.cmd("BDAT 0 LAST") == "503 5.5.1 Error: need MAIL command"
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<x@localhost>") == "250 2.1.5 Ok"
    c.send(b"BDAT 6\r\npart 2")
    assert c.reply() == "250 2.0.0 Ok: 6 bytes"
    assert c.cmd("EHLO again.example.org").startswith("250-")     # EHLO also ends a transaction
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<x@localhost>") == "250 2.1.5 Ok"
    c.send(b"BDAT 6\r\npart 3")
    assert c.reply() == "250 2.0.0 Ok: 6 bytes"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    assert c.closed()
    assert relay.wait_log("disconnect from unknown[127.0.0.1]")
    assert wait_until(lambda: all_files(relay, "tmp") == [])
    assert all_files(relay, "new") == []


def test_timeout_in_large_bdat_leaves_nothing(relay_factory):
    # a high smtpd_min_data_rate: the bytes sent add almost nothing to the request's deadline
    r = relay_factory("smtpd_timeout = 2s\nsmtpd_min_data_rate = 100000000\n")
    c = SmtpConn(r.port())
    start_data(c)
    c.send(b"BDAT 3000000 LAST\r\n")
    c.wait_read_by_server()
    c.send(b"w" * 200000)
    assert c.reply() == "421 4.4.2 mx.example.test Error: timeout exceeded"
    assert c.closed()
    assert r.wait_log("timeout after BDAT from unknown[127.0.0.1]")
    assert wait_until(lambda: all_files(r, "tmp") == [])
    assert all_files(r, "new") == []
    queued(send_data(SmtpConn(r.port()), b"Subject: next\r\n\r\n"))


def test_starttls_not_offered_without_certificate(relay):
    c = SmtpConn(relay.port())
    assert "STARTTLS" not in c.cmd("EHLO c.example.org")
    assert c.cmd("STARTTLS") == "502 5.5.1 Error: command not implemented"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"


def test_commands_after_quit_are_not_run(relay):
    c = SmtpConn(relay.port())
    c.send(b"HELO c.example.org\r\nQUIT\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n")
    assert c.reply() == "250 mx.example.test"
    assert c.reply() == "221 2.0.0 Bye"
    assert c.closed()
    assert relay.wait_log("disconnect from unknown[127.0.0.1] helo=1 quit=1 commands=2")
