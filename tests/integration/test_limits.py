"""smtpd_soft_error_limit / smtpd_error_sleep_time: past the soft limit every
error reply is held back for the sleep time (Postfix's tarpit); good replies
are not delayed, and the session goes on."""
import socket
import time


def chat(sock, f, line):
    sock.sendall(line + b"\r\n")
    t0 = time.monotonic()
    reply = f.readline()
    return reply, time.monotonic() - t0


def test_error_replies_slow_down_past_soft_limit(relay_factory):
    relay = relay_factory("smtpd_soft_error_limit = 2\nsmtpd_error_sleep_time = 1s\nsmtpd_hard_error_limit = 10\n")
    with socket.create_connection(("127.0.0.1", relay.port()), timeout=10) as sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220 ")
        for _ in range(2):
            reply, took = chat(sock, f, b"BOGUS")
            assert reply.startswith(b"502 5.5.2")
            assert took < 0.8, took
        reply, took = chat(sock, f, b"BOGUS")
        assert reply.startswith(b"502 5.5.2")
        assert took >= 0.9, took
        reply, took = chat(sock, f, b"NOOP")
        assert reply.startswith(b"250 ")
        assert took < 0.8, took
        reply, took = chat(sock, f, b"RCPT TO:<a@localhost>")
        assert reply.startswith(b"503 5.5.1")
        assert took >= 0.9, took
        reply, _ = chat(sock, f, b"QUIT")
        assert reply.startswith(b"221 ")


def test_no_delay_below_soft_limit(relay_factory):
    relay = relay_factory("smtpd_soft_error_limit = 10\nsmtpd_error_sleep_time = 2s\n")
    with socket.create_connection(("127.0.0.1", relay.port()), timeout=10) as sock:
        f = sock.makefile("rb")
        f.readline()
        for _ in range(5):
            reply, took = chat(sock, f, b"BOGUS")
            assert reply.startswith(b"502 ")
            assert took < 1.5, took
