"""ktrelay behind a real HAProxy (Debian's package, TCP mode) with
smtpd_upstream_proxy_protocol = haproxy: send-proxy (v1) and send-proxy-v2.
HAProxy's own address (127.0.0.1) is in mynetworks, the clients (other
127.0.0.x addresses) are not: the address in the PROXY header must be the
client for relay control, limits, logs and Received:. A connection without a
valid header is closed and never taken for the proxy's address."""
import shutil
import socket
import ssl
import subprocess
import time

import pytest

from conftest import SmtpConn, free_port, make_cert, after_trace

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")

MAIN = "mynetworks = 127.0.0.1/32\nsmtpd_upstream_proxy_timeout = 2s\n"


class HAProxy:
    """haproxy -db in TCP mode: one frontend per (name, backend port, server option)."""

    def __init__(self, tmp, routes):
        self.ports = {}
        cfg = ["global", "  maxconn 200", "defaults", "  mode tcp", "  timeout connect 5s",
               "  timeout client 30s", "  timeout server 30s"]
        for name, (backend_port, option) in routes.items():
            port = free_port()
            self.ports[name] = port
            cfg += [f"frontend f_{name}", f"  bind 127.0.0.1:{port}", f"  default_backend b_{name}",
                    f"backend b_{name}", f"  server s_{name} 127.0.0.1:{backend_port} {option}"]
        path = tmp / "haproxy.cfg"
        path.write_text("\n".join(cfg) + "\n")
        self.log = open(tmp / "haproxy.log", "w+b")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        for port in self.ports.values():
            while True:
                assert self.proc.poll() is None, (tmp / "haproxy.log").read_text()
                try:
                    # the probe reaches ktrelay through HAProxy: it comes from an address no test uses
                    socket.create_connection(("127.0.0.1", port), timeout=0.2,
                                             source_address=("127.0.0.250", 0)).close()
                    break
                except OSError:
                    assert time.time() < deadline, "haproxy did not listen"
                    time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def behind_haproxy(relay_factory, tmp_path):
    made = []

    def start(extra="", services=None, routes=None):
        r = relay_factory(MAIN + extra, services=services or {"smtp": {"smtpd_upstream_proxy_protocol": "haproxy"}})
        hp = HAProxy(tmp_path, routes or {"v1": (r.port(), "send-proxy"), "v2": (r.port(), "send-proxy-v2")})
        made.append(hp)
        return r, hp

    yield start
    for hp in made:
        hp.stop()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_address_is_the_client(behind_haproxy, version):
    r, hp = behind_haproxy()
    c = SmtpConn(hp.ports[version], src="127.0.0.2")
    assert c.banner == "220 mx.example.test ESMTP ktrelay"
    assert c.cmd("EHLO client.example").startswith("250-mx.example.test")
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    # HAProxy's 127.0.0.1 may relay; the client behind it may not
    assert c.cmd("RCPT TO:<x@remote.example>") == "554 5.7.1 <x@remote.example>: Relay access denied"
    assert c.cmd("RCPT TO:<someone@localhost>") == "250 2.1.5 Ok"
    assert c.cmd("DATA").startswith("354 ")
    c.send(b"Subject: proxied\r\n\r\nhi\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as ")
    c.cmd("QUIT")
    files = r.maildir_files()
    assert len(files) == 1
    assert after_trace(files[0].read_bytes()).startswith(b"Received: from client.example (unknown [127.0.0.2])\r\n")
    log = r.log()
    assert "connect from unknown[127.0.0.2]" in log
    assert "NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 554 5.7.1 <x@remote.example>: Relay access denied" in log
    assert r.wait_log("disconnect from unknown[127.0.0.2] ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=6")
    assert "connect from unknown[127.0.0.1]" not in log


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxied_trusted_client_may_relay(behind_haproxy, version):
    r, hp = behind_haproxy()
    c = SmtpConn(hp.ports[version], src="127.0.0.1")
    assert c.cmd("EHLO client.example").startswith("250-")
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<x@remote.example>") == "250 2.1.5 Ok"
    assert c.cmd("RSET") == "250 2.0.0 Ok"


def closed_without_reply(s):
    """The server closed: EOF, or a reset because it did not read what was sent."""
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True


def test_direct_connection_without_header_is_closed(behind_haproxy):
    r, hp = behind_haproxy()
    # from 127.0.0.1, the proxy's own (trusted) address: no banner, no command runs
    s = socket.create_connection(("127.0.0.1", r.port()), timeout=10)
    s.sendall(b"EHLO client.example\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<x@remote.example>\r\n")
    assert closed_without_reply(s)
    s.close()
    assert r.wait_log("warning: haproxy read from 127.0.0.1: no PROXY protocol header; closing")
    # a malformed header is refused the same way
    s = socket.create_connection(("127.0.0.1", r.port()), timeout=10)
    s.sendall(b"PROXY TCP4 127.0.0.2 127.0.0.1 99999 25\r\nEHLO x\r\n")
    assert closed_without_reply(s)
    s.close()
    assert r.wait_log("warning: haproxy read from 127.0.0.1: malformed PROXY v1 line; closing")
    # silence until smtpd_upstream_proxy_timeout
    s = socket.create_connection(("127.0.0.1", r.port()), timeout=10)
    assert s.recv(4096) == b""
    s.close()
    assert r.wait_log("warning: haproxy read: timeout reading the PROXY header from 127.0.0.1; closing")
    assert "connect from unknown[127.0.0.1]" not in r.log()


def test_limits_apply_to_the_header_address(behind_haproxy):
    r, hp = behind_haproxy("smtpd_client_connection_count_limit = 1\n")
    first = SmtpConn(hp.ports["v2"], src="127.0.0.3")
    assert first.banner.startswith("220 ")
    second = SmtpConn(hp.ports["v2"], src="127.0.0.3")
    assert second.banner == "421 4.7.0 mx.example.test Error: too many connections from 127.0.0.3"
    other = SmtpConn(hp.ports["v1"], src="127.0.0.4")
    assert other.banner.startswith("220 ")
    assert r.wait_log("warning: Connection concurrency limit exceeded: 2 from unknown[127.0.0.3]")


def test_wrapper_mode_tls_behind_proxy(behind_haproxy, tmp_path):
    cert, key = make_cert(tmp_path)
    r, hp = behind_haproxy(f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n",
                           services={"smtp": {"smtpd_upstream_proxy_protocol": "haproxy",
                                               "smtpd_tls_wrappermode": "yes"}})
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for version in ("v1", "v2"):
        c = SmtpConn(hp.ports[version], src="127.0.0.5", tls=ctx)
        assert c.banner == "220 mx.example.test ESMTP ktrelay"
        assert c.cmd("EHLO client.example").startswith("250-")
        assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
        assert c.cmd("RCPT TO:<x@remote.example>") == "554 5.7.1 <x@remote.example>: Relay access denied"
        c.cmd("QUIT")
    assert r.wait_log("connect from unknown[127.0.0.5]")


def test_unknown_proxy_protocol_is_a_config_error(tmp_path):
    from conftest import BIN
    (tmp_path / "main.cf").write_text("smtpd_upstream_proxy_protocol = nginx\n")
    p = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 78     # EX_CONFIG
    assert 'smtpd_upstream_proxy_protocol: unsupported value "nginx" (empty or haproxy)' in p.stdout + p.stderr


def test_v1_ipv4_mapped_address_is_the_ipv4_client(relay_factory):
    # the header of an HAProxy listening on :: (v4v6) names an IPv4 client as ::ffff:a.b.c.d;
    # it is that IPv4 client for mynetworks, logs, limits and DNS lists, as with v2 and a socket
    r = relay_factory(MAIN, services={"smtp": {"smtpd_upstream_proxy_protocol": "haproxy"}})
    s = socket.create_connection(("127.0.0.1", r.port()), timeout=10)
    s.sendall(b"PROXY TCP6 ::ffff:127.0.0.2 ::ffff:127.0.0.1 40000 25\r\n")
    c = SmtpConn(sock=s)
    assert c.banner == "220 mx.example.test ESMTP ktrelay"
    assert c.cmd("EHLO client.example").startswith("250-")
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<x@remote.example>") == "554 5.7.1 <x@remote.example>: Relay access denied"
    c.cmd("QUIT")
    assert r.wait_log("connect from unknown[127.0.0.2]")
    assert "::ffff:" not in r.log()
