"""smtpd_soft_error_limit / smtpd_error_sleep_time: past the soft limit every
error reply is held back for the sleep time (Postfix's tarpit); good replies
are not delayed, and the session goes on."""
import time

from conftest import SmtpConn


def chat(c, line):
    """One command; its reply and how long the reply took, in seconds."""
    t0 = time.monotonic()
    reply = c.cmd(line)
    return reply, time.monotonic() - t0


def test_error_replies_slow_down_past_soft_limit(relay_factory):
    relay = relay_factory("smtpd_soft_error_limit = 2\nsmtpd_error_sleep_time = 1s\nsmtpd_hard_error_limit = 10\n")
    c = SmtpConn(relay.port(), timeout=10)
    assert c.banner.startswith("220 ")
    for _ in range(2):
        reply, took = chat(c, "BOGUS")
        assert reply.startswith("502 5.5.2")
        assert took < 0.8, took
    reply, took = chat(c, "BOGUS")
    assert reply.startswith("502 5.5.2")
    assert took >= 0.9, took
    reply, took = chat(c, "NOOP")
    assert reply.startswith("250 ")
    assert took < 0.8, took
    reply, took = chat(c, "RCPT TO:<a@localhost>")
    assert reply.startswith("503 5.5.1")
    assert took >= 0.9, took
    c.quit()


def test_no_delay_below_soft_limit(relay_factory):
    relay = relay_factory("smtpd_soft_error_limit = 10\nsmtpd_error_sleep_time = 2s\n")
    c = SmtpConn(relay.port(), timeout=10)
    for _ in range(5):
        reply, took = chat(c, "BOGUS")
        assert reply.startswith("502 ")
        assert took < 1.5, took
    c.close()
