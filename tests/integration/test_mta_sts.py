"""MTA-STS (RFC 8461) in the outbound client: the _mta-sts TXT record and the MX records from the test DNS
responder, the policy from a local HTTPS server (Python's ssl, certificate from a test CA for
mta-sts.DOMAIN, on port 443 of its own loopback address), and a second ktrelay as the MX with a
certificate from the same CA. enforce: an MX the policy does not list is not used (deferred 4.7.5), a
certificate that does not match the MX name defers; testing: both are logged and the mail goes out; the
policy is cached in data_directory (used with the HTTPS server stopped and after a restart, fetched again
when the TXT id changes)."""
import http.server
import os
import random
import re
import socket
import ssl
import subprocess
import threading

import pytest

from test_relay import BODY, nodes, wait_for  # noqa: F401  (fixtures)
from test_relay_dns import dns, dns_cf  # noqa: F401  (fixtures)
from conftest import made_by_test, make_cert, make_searchable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the policy server listens on port 443 (root)")


def ca_signed(tmp, name, ca_cert, ca_key):
    """A certificate for DNS name `name` signed by the test CA; returns (cert, key)."""
    key, csr, cert, ext = (tmp / f"{name}.key", tmp / f"{name}.csr", tmp / f"{name}.pem", tmp / f"{name}.ext")
    ext.write_text(f"subjectAltName=DNS:{name}\n")
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-days", "30", "-extfile", str(ext), "-out", str(cert)],
                   check=True, capture_output=True)
    os.chmod(key, 0o644)
    return cert, key


class PolicyServer:
    """HTTPS on ADDR:443 serving /.well-known/mta-sts.txt (text/plain) with `policy`; `requests`
    counts the GETs; `status`/`headers` change the answer."""

    def __init__(self, cert, key, policy):
        self.policy = policy
        self.status = 200
        self.headers = {"Content-Type": "text/plain"}
        self.requests = 0
        self.addr = None
        self.hold = None               # a threading.Event the answer waits for
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                if server.hold:
                    server.hold.wait(30)
                body = server.policy.encode()
                self.send_response(server.status)
                for k, v in server.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        for _ in range(50):
            addr = f"127.0.{random.randint(100, 250)}.{random.randint(2, 250)}"
            try:
                self.httpd = http.server.ThreadingHTTPServer((addr, 443), Handler)
                self.addr = addr
                break
            except OSError:
                continue
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        if self.hold:
            self.hold.set()
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


def policy_text(mode, mx, max_age=86400):
    return "version: STSv1\r\nmode: %s\r\n%smax_age: %d\r\n" % (mode, "".join(f"mx: {m}\r\n" for m in mx), max_age)


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    make_searchable(d)
    ca_cert, ca_key = make_cert(d, "ca", cn="Test CA")
    os.chmod(ca_cert, 0o644)
    return dict(dir=d, ca=ca_cert, sign=lambda name: ca_signed(d, name, ca_cert, ca_key))


@pytest.fixture
def policy_servers():
    yield from made_by_test(lambda pki, domain, policy: PolicyServer(*pki["sign"](f"mta-sts.{domain}"), policy),
                            end="stop")


def final_node(nodes, pki, names=("mx.example.test",), extra=""):
    """The receiving MX: one SMTP service per certificate name, STARTTLS offered."""
    services = {}
    for i, name in enumerate(names):
        cert, key = pki["sign"](name)
        services[f"smtp{i}"] = {"smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(cert),
                                "smtpd_tls_key_file": str(key)}
    return nodes("myhostname = final.example.test\nvirtual_mailbox_domains = localhost, example.test\n" + extra,
                 services=services).start()


def front_cf(d, pki, port, extra=""):
    return (dns_cf(d) + "myhostname = relay.sender.test\nvirtual_mailbox_domains = localhost\n"
            f"transport_maps = inline:{{example.test=smtp:example.test:{port}}}\n"
            f"ktrelay_mta_sts_enable = yes\nktrelay_mta_sts_CAfile = {pki['ca']}\nsmtp_tls_CAfile = {pki['ca']}\n"
            "smtp_tls_loglevel = 1\n" + extra)


def records(server, mx_hosts, sts_id="20261130a"):
    r = {("example.test", "MX"): [(10 * (i + 1), h) for i, h in enumerate(mx_hosts)],
         ("mta-sts.example.test", "A"): [server.addr]}
    for h in mx_hosts:
        r[(h, "A")] = ["127.0.0.1"]
    if sts_id:
        r[("_mta-sts.example.test", "TXT")] = [f"v=STSv1; id={sts_id};"]
    return r


def sts_sent(nodes, dns, pki, policy_servers, mode, patterns, mx_hosts, names=("mx.example.test",)):
    """The set-up most tests share: a final MX whose certificate has names, example.test's policy server
    (mode, mx patterns), the DNS with mx_hosts as its MX hosts, and a front relay with MTA-STS on that has
    queued one message to bob@example.test. Returns (final, srv, d, front, qid)."""
    final = final_node(nodes, pki, names=names)
    srv = policy_servers(pki, "example.test", policy_text(mode, patterns))
    d = dns(records(srv, mx_hosts))
    front = nodes(front_cf(d, pki, final.r.port("smtp0"))).start()
    return final, srv, d, front, front.sendmail(["bob@example.test"], BODY)


def test_enforce_matching_mx_with_valid_certificate_delivers(nodes, dns, pki, policy_servers):
    final, srv, d, front, qid = sts_sent(nodes, dns, pki, policy_servers, "enforce", ["mx.example.test"],
                                         ["mx.example.test"])
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=mx.example.test\[127.0.0.1\]:\d+, .*dsn=2.0.0, "
                          r"status=sent"), front.log()
    log = front.log()
    assert "MTA-STS policy for example.test: id 20261130a, mode enforce, max_age 86400, 1 mx pattern" in log
    assert re.search(r"Verified TLS connection established to mx.example.test\[127.0.0.1\]:\d+: TLSv1", log), log
    assert ("_mta-sts.example.test", "TXT") in d.queries and srv.requests == 1
    cache = (front.d / "data" / "mta-sts" / "example.test").read_bytes().decode()
    assert cache == "ktrelay-mta-sts 1 20261130a %s\n" % cache.split()[3] + policy_text("enforce", ["mx.example.test"])
    assert len(wait_for(lambda: final.r.maildir_files("example.test/bob/"))) == 1


def test_enforce_refuses_mx_not_in_policy(nodes, dns, pki, policy_servers):
    final, srv, d, front, qid = sts_sent(nodes, dns, pki, policy_servers, "enforce",
                                         ["mx.example.test", "*.mx.example.test"], ["other.example.net"],
                                         names=("other.example.net",))
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=none, .*dsn=4.7.5, status=deferred \(MX host "
                          r"other.example.net does not match the MTA-STS policy of example.test \(mode enforce\)\)"), \
        front.log()
    assert ("MTA-STS policy of example.test (mode enforce): MX host other.example.net does not match the policy; "
            "not used") in front.log()
    assert "connect to" not in front.log() and "TLS connection established" not in front.log()
    assert final.r.maildir_files("example.test/bob/") == []


def test_enforce_certificate_not_matching_mx_defers(nodes, dns, pki, policy_servers):
    # the policy allows mx2 by its wildcard, but the server's certificate names another host
    final, srv, d, front, qid = sts_sent(nodes, dns, pki, policy_servers, "enforce", ["*.example.test"],
                                         ["mx2.example.test"], names=("mx.example.test",))
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=none, .*dsn=4.7.5, status=deferred \(Server "
                          r"certificate not verified\)"), front.log()
    assert front.wait_log(r"server certificate verification failed for mx2.example.test\[127.0.0.1\]:\d+: "
                          r"num=62:hostname mismatch"), front.log()
    assert final.r.maildir_files("example.test/bob/") == []


def test_testing_mode_logs_and_delivers(nodes, dns, pki, policy_servers):
    final, srv, d, front, qid = sts_sent(nodes, dns, pki, policy_servers, "testing", ["mx.example.test"],
                                         ["other.example.net"], names=("mx.example.test",))
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=other.example.net\[127.0.0.1\]:\d+, .*status=sent"), \
        front.log()
    log = front.log()
    assert ("MTA-STS policy of example.test (mode testing): MX host other.example.net does not match the policy; "
            "used (testing)") in log
    assert re.search(r"MTA-STS policy of example.test \(mode testing\): TLS with other.example.net\[127.0.0.1\] "
                     r"failed \(certificate-host-mismatch\); delivering anyway", log), log
    assert re.search(r"Untrusted TLS connection established to other.example.net\[127.0.0.1\]", log), log
    assert len(wait_for(lambda: final.r.maildir_files("example.test/bob/"))) == 1


def test_policy_cached_across_restart_and_refetched_on_new_id(nodes, dns, pki, policy_servers):
    final, srv, d, front, qid = sts_sent(nodes, dns, pki, policy_servers, "enforce", ["mx.example.test"],
                                         ["mx.example.test"], names=("mx.example.test", "other.example.net"))
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, .*status=sent"), front.log()
    assert srv.requests == 1

    # the policy server goes away and the MX changes: after a restart the cached policy still enforces
    srv.stop()
    d.records = records(srv, ["other.example.net"])
    front.stop()
    front.start()
    qid = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=none, .*dsn=4.7.5, status=deferred \(MX host "
                          r"other.example.net does not match the MTA-STS policy of example.test"), front.log()
    assert "policy fetch" not in front.log()

    # no TXT record at all: the cached policy applies until it expires (RFC 8461 5.1)
    front.stop()
    d.records = records(srv, ["other.example.net"], sts_id=None)
    front.start()
    qid = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=none, .*dsn=4.7.5, status=deferred \(MX host "
                          r"other.example.net does not match"), front.log()

    # a new id: fetched again; the new policy (testing) lets the other MX be used
    srv2 = policy_servers(pki, "example.test", policy_text("testing", ["mx.example.test"]))
    front.stop()
    d.records = records(srv2, ["other.example.net"], sts_id="20261130b")
    front.start()
    qid = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=other.example.net\[127.0.0.1\]:\d+, .*status=sent"), \
        front.log()
    assert srv2.requests == 1
    assert "MTA-STS policy for example.test: id 20261130b, mode testing" in front.log()
    assert (front.d / "data" / "mta-sts" / "example.test").read_text().startswith("ktrelay-mta-sts 1 20261130b ")


def test_redirect_and_wrong_type_are_not_policies(nodes, dns, pki, policy_servers):
    final = final_node(nodes, pki, names=("other.example.net",))
    srv = policy_servers(pki, "example.test", policy_text("enforce", ["mx.example.test"]))
    srv.status = 301
    srv.headers["Location"] = "https://elsewhere.example/.well-known/mta-sts.txt"
    d = dns(records(srv, ["other.example.net"]))
    front = nodes(front_cf(d, pki, final.r.port("smtp0"))).start()
    qid = front.sendmail(["bob@example.test"], BODY)
    # no policy: delivered as without MTA-STS
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=other.example.net\[127.0.0.1\]:\d+, .*status=sent"), \
        front.log()
    assert "MTA-STS policy fetch for example.test failed: HTTP status 301" in front.log()
    assert srv.requests == 1


def test_configuration_checks(tmp_path):
    from conftest import BIN, BASE_MAIN_CF
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "master.cf").write_text("127.0.0.1:2525 inet n - n - - smtpd\n")
    (d / "main.cf").write_text(BASE_MAIN_CF.format(dir=d) + "ktrelay_mta_sts_enable = yes\n"
                               "ktrelay_mta_sts_CAfile = /nonexistent/ca.pem\n"
                               "ktrelay_mta_sts_cache_directory = relative/dir\n")
    p = subprocess.run([BIN, "check-config", "-c", str(d)], capture_output=True, text=True)
    assert p.returncode == 78
    assert "ktrelay_mta_sts_CAfile: cannot read /nonexistent/ca.pem" in p.stderr, p.stderr
    assert 'ktrelay_mta_sts_cache_directory must be an absolute path, not "relative/dir"' in p.stderr, p.stderr
    (d / "main.cf").write_text(BASE_MAIN_CF.format(dir=d) + "ktrelay_mta_sts_enable = maybe\n")
    p = subprocess.run([BIN, "check-config", "-c", str(d)], capture_output=True, text=True)
    assert p.returncode == 78 and "ktrelay_mta_sts_enable" in p.stderr, p.stderr


def test_expired_policy_no_longer_applies(nodes, dns, pki, policy_servers):
    import time
    final = final_node(nodes, pki, names=("mx.example.test", "other.example.net"))
    srv = policy_servers(pki, "example.test", policy_text("enforce", ["mx.example.test"], max_age=1))
    d = dns(records(srv, ["mx.example.test"]))
    front = nodes(front_cf(d, pki, final.r.port("smtp1"))).start()
    qid = front.sendmail(["bob@example.test"], BODY)
    # the policy's only MX has the other service's certificate: enforce defers
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=none, .*dsn=4.7.5, status=deferred \(Server "
                          r"certificate not verified"), front.log()
    fetched = int((front.d / "data" / "mta-sts" / "example.test").read_text().split()[3])
    # the TXT record goes away; once max_age has passed, the cached policy is expired: no policy at all
    front.stop()
    srv.stop()
    d.records = records(srv, ["other.example.net"], sts_id=None)
    wait_for(lambda: time.time() >= fetched + 2, timeout=10)
    front.start()
    qid = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=other.example.net\[127.0.0.1\]:\d+, .*status=sent"), \
        front.log()
    assert "MTA-STS policy of" not in front.log()


def test_confined_worker_fetches_caches_and_reports(nodes, dns, pki, policy_servers):
    """master.cf's chroot y: the confined worker still reads ktrelay_mta_sts_CAfile (outside /etc) and
    writes the policy cache and the TLS reports, here in directories of their own outside data_directory."""
    final = final_node(nodes, pki)
    srv = policy_servers(pki, "example.test", policy_text("enforce", ["mx.example.test"]))
    recs = records(srv, ["mx.example.test"])
    recs[("_smtp._tls.example.test", "TXT")] = ["v=TLSRPTv1; rua=https://reports.test/x"]
    d = dns(recs)
    front = nodes(front_cf(d, pki, final.r.port("smtp0"),
                           "ktrelay_mta_sts_cache_directory = {dir}/sts-cache\nktrelay_tlsrpt_enable = yes\n"
                           "ktrelay_tlsrpt_directory = {dir}/reports\n"),
                  services={"smtp": {"_fields": "n n y - -"}}).start()
    assert front.wait_log("worker confined to "), front.log()
    qid = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=mx.example.test\[127.0.0.1\]:\d+, .*status=sent"), \
        front.log()
    assert (front.d / "sts-cache" / "example.test").read_text().startswith("ktrelay-mta-sts 1 20261130a ")
    from conftest import BIN
    subprocess.run([BIN, "tlsrpt", "flush", "-c", str(front.d)], check=True)
    assert front.wait_log(r"TLS report for example.test written: "), front.log()
    assert len(list((front.d / "reports").glob("*.json"))) == 1


def test_slow_policy_fetch_does_not_hold_other_deliveries(nodes, dns, pki, policy_servers):
    """The HTTPS fetch runs beside the queue manager's loop: while the policy server holds its answer,
    mail to another destination is delivered; then the waiting message goes out under the policy."""
    final = final_node(nodes, pki)
    srv = policy_servers(pki, "example.test", policy_text("enforce", ["mx.example.test"]))
    srv.hold = threading.Event()
    d = dns(records(srv, ["mx.example.test"]))
    port = final.r.port("smtp0")
    front = nodes(front_cf(d, pki, port).replace("example.test=smtp:example.test:%d" % port,
                                                  "example.test=smtp:example.test:%d, localhost=smtp:[127.0.0.1]:%d"
                                                  % (port, port))
                  .replace("virtual_mailbox_domains = localhost\n", "virtual_mailbox_domains = sender.test\n")).start()
    held = front.sendmail(["bob@example.test"], BODY)
    wait_for(lambda: srv.requests == 1, timeout=10)
    other = front.sendmail(["postmaster@localhost"], BODY)
    assert front.wait_log(rf"{other}: to=<postmaster@localhost>, relay=127.0.0.1\[127.0.0.1\]:\d+, .*status=sent"), \
        front.log()
    assert f"{held}: to=<bob@example.test>" not in front.log() and srv.requests == 1
    srv.hold.set()
    assert front.wait_log(rf"{held}: to=<bob@example.test>, relay=mx.example.test\[127.0.0.1\]:\d+, .*status=sent"), \
        front.log()


def test_enforce_without_starttls_defers_and_testing_delivers(nodes, dns, pki, policy_servers):
    # the MX offers no STARTTLS at all
    final = nodes("myhostname = final.example.test\nvirtual_mailbox_domains = localhost, example.test\n").start()
    srv = policy_servers(pki, "example.test", policy_text("enforce", ["mx.example.test"]))
    d = dns(records(srv, ["mx.example.test"]))
    front = nodes(front_cf(d, pki, final.r.port())).start()
    qid = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=none, .*status=deferred \(TLS is required, but was "
                          r"not offered by host mx.example.test\[127.0.0.1\]:\d+\)"), front.log()
    assert final.r.maildir_files("example.test/bob/") == []
    # the same MX under a testing policy (new id): logged, sent in plaintext
    srv2 = policy_servers(pki, "example.test", policy_text("testing", ["mx.example.test"]))
    front.stop()
    d.records = records(srv2, ["mx.example.test"], sts_id="20261130b")
    front.start()
    qid = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=mx.example.test\[127.0.0.1\]:\d+, .*status=sent"), \
        front.log()
    assert re.search(r"MTA-STS policy of example.test \(mode testing\): TLS with mx.example.test\[127.0.0.1\] failed "
                     r"\(starttls-not-supported\); delivering anyway", front.log()), front.log()
