"""Per-client limits (Postfix's anvil): connection count and rate, message,
recipient, AUTH and new-TLS-session rates, counted per client address across
all worker threads and connections, with Postfix's replies and log lines;
clients in smtpd_client_event_limit_exceptions are never limited. Clients are
different 127.0.0.x source addresses; the base configuration's mynetworks
holds none of them."""
import socket
import ssl
import time

from conftest import SmtpConn, make_cert

SVC_LINE = "for service 127.0.0.1:{port}"


def wait_until(pred, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_connection_count_limit(relay_factory):
    r = relay_factory("smtpd_client_connection_count_limit = 6\n")
    port = r.port()
    # six at once from one address: with two worker threads these land on both
    held = [SmtpConn(port, src="127.0.0.2") for _ in range(6)]
    for c in held:
        assert c.banner == "220 mx.example.test ESMTP ktrelay"
    c7 = SmtpConn(port, src="127.0.0.2")
    assert c7.banner == "421 4.7.0 mx.example.test Error: too many connections from 127.0.0.2"
    assert c7.closed()
    assert r.wait_log("warning: Connection concurrency limit exceeded: 7 from unknown[127.0.0.2] "
                      + SVC_LINE.format(port=port))
    # another address is served meanwhile
    other = SmtpConn(port, src="127.0.0.3")
    assert other.banner == "220 mx.example.test ESMTP ktrelay"
    assert other.cmd("EHLO other.example").startswith("250-")
    # one of the six leaves: its place is free again
    assert held[0].cmd("QUIT") == "221 2.0.0 Bye"
    assert held[0].closed()

    def admitted():
        c = SmtpConn(port, src="127.0.0.2")
        ok = c.banner.startswith("220 ")
        c.close()
        return ok
    assert wait_until(admitted)
    for c in held[1:]:
        assert c.cmd("NOOP") == "250 2.0.0 Ok"


def test_connection_rate_limit(relay_factory):
    r = relay_factory("smtpd_client_connection_rate_limit = 3\nanvil_rate_time_unit = 2s\n")
    port = r.port()
    for _ in range(3):
        c = SmtpConn(port, src="127.0.0.4")
        assert c.banner.startswith("220 ")
        c.close()
    c = SmtpConn(port, src="127.0.0.4")
    assert c.banner == "421 4.7.0 mx.example.test Error: too many connections from 127.0.0.4"
    assert c.closed()
    assert r.wait_log("warning: Connection rate limit exceeded: 4 from unknown[127.0.0.4] "
                      + SVC_LINE.format(port=port))
    other = SmtpConn(port, src="127.0.0.5")
    assert other.banner.startswith("220 ")
    # a new window begins after anvil_rate_time_unit

    def admitted():
        c = SmtpConn(port, src="127.0.0.4")
        ok = c.banner.startswith("220 ")
        c.close()
        return ok
    assert wait_until(admitted, timeout=8)


def test_message_rate_limit_across_connections(relay_factory):
    r = relay_factory("smtpd_client_message_rate_limit = 2\n")
    port = r.port()
    for _ in range(2):
        c = SmtpConn(port, src="127.0.0.6")
        assert c.cmd("EHLO c.example").startswith("250-")
        assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
        c.cmd("QUIT")
    c = SmtpConn(port, src="127.0.0.6")
    assert c.cmd("EHLO c.example").startswith("250-")
    assert c.cmd("MAIL FROM:<s@example.org>") == "450 4.7.1 Error: too much mail from 127.0.0.6"
    assert r.wait_log("warning: Message delivery request rate limit exceeded: 3 from unknown[127.0.0.6] "
                      + SVC_LINE.format(port=port))
    c2 = SmtpConn(port, src="127.0.0.7")
    assert c2.cmd("EHLO c.example").startswith("250-")
    assert c2.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"


def test_recipient_rate_limit(relay_factory):
    r = relay_factory("smtpd_client_recipient_rate_limit = 3\n")
    c = SmtpConn(r.port(), src="127.0.0.8")
    assert c.cmd("EHLO c.example").startswith("250-")
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    for i in range(3):
        assert c.cmd(f"RCPT TO:<r{i}@localhost>") == "250 2.1.5 Ok"
    assert c.cmd("RCPT TO:<r3@localhost>") == "450 4.7.1 Error: too many recipients from 127.0.0.8"
    assert r.wait_log("warning: Recipient address rate limit exceeded: 4 from unknown[127.0.0.8]")
    # the recipients accepted before still get the message
    assert c.cmd("DATA").startswith("354 ")
    c.send(b"Subject: t\r\n\r\nx\r\n.\r\n")
    reply = c.reply()
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    # three recipients: through the queue, a copy each into the catch-all
    assert r.wait_log(f"{reply.split()[-1]}: removed", timeout=30)
    assert len(r.maildir_files()) == 3


def test_auth_rate_limit(relay_factory, tmp_path):
    cert, key = make_cert(tmp_path)
    pw = tmp_path / "passwd"
    pw.write_text("alice:$6$abcdefgh$1111\n")
    r = relay_factory(f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\nsmtpd_tls_security_level = may\n"
                      f"ktrelay_sasl_password_file = {pw}\nsmtpd_sasl_auth_enable = yes\n"
                      "smtpd_client_auth_rate_limit = 1\n")
    c = SmtpConn(r.port(), src="127.0.0.9")
    assert c.cmd("EHLO c.example").startswith("250-")
    c.starttls()
    assert c.cmd("EHLO c.example").startswith("250-")
    assert c.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert c.cmd("*") == "501 5.7.0 Authentication aborted"
    assert c.cmd("AUTH LOGIN") == "450 4.7.1 Error: too many AUTH commands from 127.0.0.9"
    assert r.wait_log("warning: AUTH command rate limit exceeded: 2 from unknown[127.0.0.9]")


def test_new_tls_session_rate_limit(relay_factory, tmp_path):
    cert, key = make_cert(tmp_path)
    r = relay_factory(f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\nsmtpd_tls_security_level = may\n"
                      "smtpd_client_new_tls_session_rate_limit = 1\n")
    c = SmtpConn(r.port(), src="127.0.0.10")
    assert c.cmd("EHLO c.example").startswith("250-")
    c.starttls()
    assert c.cmd("EHLO c.example").startswith("250-")
    c.cmd("QUIT")
    c2 = SmtpConn(r.port(), src="127.0.0.10")
    assert c2.cmd("EHLO c.example").startswith("250-")
    assert c2.cmd("STARTTLS") == "454 4.7.0 Error: too many new TLS sessions from 127.0.0.10"
    assert r.wait_log("warning: New TLS session rate limit exceeded: 1 from unknown[127.0.0.10]")
    # the session goes on in plaintext; another client still gets TLS
    assert c2.cmd("NOOP") == "250 2.0.0 Ok"
    c3 = SmtpConn(r.port(), src="127.0.0.11")
    assert c3.cmd("EHLO c.example").startswith("250-")
    c3.starttls()
    assert c3.cmd("EHLO c.example").startswith("250-")


def test_exceptions_are_not_limited(relay_factory):
    r = relay_factory("smtpd_client_connection_count_limit = 1\nsmtpd_client_message_rate_limit = 1\n"
                      "smtpd_client_event_limit_exceptions = 127.0.0.12\n")
    port = r.port()
    held = [SmtpConn(port, src="127.0.0.12") for _ in range(3)]
    for c in held:
        assert c.banner.startswith("220 ")
        assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    first = SmtpConn(port, src="127.0.0.13")
    assert first.banner.startswith("220 ")
    assert SmtpConn(port, src="127.0.0.13").banner.startswith("421 4.7.0 ")


def test_default_exceptions_are_mynetworks(relay_factory):
    r = relay_factory("mynetworks = 127.0.0.14/32\nsmtpd_client_connection_count_limit = 1\n")
    held = [SmtpConn(r.port(), src="127.0.0.14") for _ in range(3)]
    assert all(c.banner.startswith("220 ") for c in held)
    first = SmtpConn(r.port(), src="127.0.0.15")
    assert first.banner.startswith("220 ")
    assert SmtpConn(r.port(), src="127.0.0.15").banner.startswith("421 4.7.0 ")
