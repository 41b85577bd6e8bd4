"""Senders Postfix accepts: EHLO/HELO with any argument unless a restriction
refuses it, MAIL without HELO unless smtpd_helo_required = yes, recipients up
to smtpd_recipient_limit (not a smaller built-in cap), excess recipients that
do not end the session (smtpd_recipient_overshoot_limit), and Postfix's reply
to an empty command line. Every exchange is asserted byte for byte."""
import socket

import pytest

from conftest import SmtpConn, after_trace


def deliver(c, rcpts=("someone@localhost",), body=b"Subject: t\r\n\r\nhello\r\n"):
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    for r in rcpts:
        assert c.cmd(f"RCPT TO:<{r}>") == "250 2.1.5 Ok"
    assert c.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    c.send(body + b".\r\n")
    reply = c.reply()
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    return reply


@pytest.mark.parametrize("name", ["[2001:db8::19]", "mail.example.net.", "2001:db8::19", "b\u00fccher.example",
                                  "two words", "a..b", "[192.0.2.300]"])
def test_ehlo_with_any_argument(relay, name):
    c = SmtpConn(relay.port())
    c.send(f"EHLO {name}\r\n".encode())
    ehlo = c.reply()
    assert ehlo.splitlines()[0] == "250-mx.example.test", ehlo
    deliver(c)
    c.send(f"HELO {name}\r\n".encode())
    assert c.reply() == "250 mx.example.test"
    deliver(c)
    files = relay.maildir_files()
    assert len(files) == 2
    assert after_trace(files[0].read_bytes()).startswith(f"Received: from {name} (".encode()), \
        files[0].read_bytes()[:200]
    assert f"helo=<{name}>" not in relay.log()   # nothing was refused


def test_helo_control_characters_are_kept_printable(relay):
    c = SmtpConn(relay.port())
    c.send(b"EHLO a\x01b\r\n")
    assert c.reply().startswith("250-mx.example.test")
    deliver(c)
    assert after_trace(relay.maildir_files()[0].read_bytes()).startswith(b"Received: from a?b (")


def test_mail_without_helo(relay):
    c = SmtpConn(relay.port())
    deliver(c)
    data = after_trace(relay.maildir_files()[0].read_bytes())
    assert data.startswith(b"Received: from unknown (unknown [127.0.0.1])\r\n"), data[:200]


def test_helo_required(relay_factory):
    r = relay_factory("smtpd_helo_required = yes\n")
    c = SmtpConn(r.port())
    assert c.cmd("MAIL FROM:<s@example.org>") == "503 5.5.1 Error: send HELO/EHLO first"
    assert c.cmd("HELO client.example.org") == "250 mx.example.test"
    deliver(c)


def test_reject_invalid_helo_hostname(relay_factory):
    r = relay_factory("smtpd_helo_restrictions = reject_invalid_helo_hostname\n")
    c = SmtpConn(r.port())
    assert c.cmd("EHLO a..b").startswith("250-")
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<someone@localhost>") == "501 5.5.2 <a..b>: Helo command rejected: Invalid name"
    assert r.wait_log("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 501 5.5.2 <a..b>: Helo command rejected: "
                      "Invalid name; from=<s@example.org> to=<someone@localhost> proto=ESMTP helo=<a..b>")
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    # valid names, address literals included, pass
    for name in ("[2001:db8::19]", "[IPv6:2001:db8::19]", "mail.example.net", "[192.0.2.1]"):
        assert c.cmd(f"EHLO {name}").startswith("250-")
        deliver(c)


def test_empty_command_line(relay):
    c = SmtpConn(relay.port())
    c.send(b"\r\n")
    assert c.reply() == "500 5.5.2 Error: bad syntax"
    c.send(b"   \r\n")
    assert c.reply() == "500 5.5.2 Error: bad syntax"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    c.cmd("QUIT")
    # not a command: the disconnect line counts only NOOP and QUIT
    assert relay.wait_log("disconnect from unknown[127.0.0.1] noop=1 quit=1 commands=2")


def many_boxes(n):
    return "".join(f"u{i}@example.test example.test/u{i}/\n" for i in range(n))


def test_recipients_up_to_the_limit_with_distinct_mailboxes(relay_factory):
    """RFC 5321 4.5.3.1.8: at least 100 recipients MUST be buffered; 150 distinct Maildirs in one message."""
    r = relay_factory(vmailbox=many_boxes(150))
    c = SmtpConn(r.port())
    assert c.cmd("EHLO c.example.org").startswith("250-")
    deliver(c, rcpts=[f"u{i}@example.test" for i in range(150)])
    # several recipients go through the queue, a copy each
    assert r.wait_log(": removed", timeout=60), r.log()[-3000:]
    for i in range(150):
        files = r.maildir_files(f"example.test/u{i}/")
        assert len(files) == 1, i
        assert files[0].read_bytes().endswith(b"\r\nhello\r\n")


def test_excess_recipients_do_not_end_the_session(relay_factory):
    r = relay_factory("smtpd_recipient_limit = 3\nsmtpd_hard_error_limit = 5\n")
    c = SmtpConn(r.port())
    assert c.cmd("EHLO c.example.org").startswith("250-")
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    for i in range(3):
        assert c.cmd(f"RCPT TO:<r{i}@localhost>") == "250 2.1.5 Ok"
    # 30 more in one pipelined group: far past smtpd_hard_error_limit, none counted
    c.send("".join(f"RCPT TO:<x{i}@localhost>\r\n" for i in range(30)))
    for _ in range(30):
        assert c.reply() == "452 4.5.3 Error: too many recipients"
    assert c.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    c.send(b"Subject: t\r\n\r\nhello\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as ")
    assert r.wait_log(": removed", timeout=30)
    assert len(r.maildir_files()) == 3          # r0@, r1@, r2@: the catch-all gets a copy each


def test_overshoot_limit(relay_factory):
    r = relay_factory("smtpd_recipient_limit = 1\nsmtpd_recipient_overshoot_limit = 2\n"
                      "smtpd_hard_error_limit = 3\n")
    c = SmtpConn(r.port())
    assert c.cmd("EHLO c.example.org").startswith("250-")
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<a@localhost>") == "250 2.1.5 Ok"
    # two free excess recipients, then each one is an error: the third error ends the session
    for _ in range(4):
        assert c.cmd("RCPT TO:<b@localhost>") == "452 4.5.3 Error: too many recipients"
    c.send("RCPT TO:<b@localhost>\r\n")
    assert c.reply() == "452 4.5.3 Error: too many recipients"
    assert c.reply() == "421 4.7.0 mx.example.test Error: too many errors"
    assert c.closed()
