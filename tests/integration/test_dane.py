"""DANE (RFC 7672) on the outbound client, against a validating resolver the test runs: Debian's
Unbound, on a loopback port, serving a zone the test signs with ldnsutils (ldns-keygen, ldns-signzone)
and an unsigned one, with the signed zone's DS as its only trust anchor. ktrelay asks with the AD bit
and trusts only answers the resolver says it validated, as Postfix does. The next hop is a second
ktrelay offering STARTTLS with a certificate whose public key the TLSA records name (or not)."""
import hashlib
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import made_by_test, make_cert
from test_relay import BODY, nodes, sinks, wait_for  # noqa: F401 (fixtures)

UNBOUND = "/usr/sbin/unbound"

pytestmark = pytest.mark.skipif(not (os.path.exists(UNBOUND) and shutil.which("ldns-signzone")),
                                reason="unbound and ldnsutils not installed")


def free_udp_tcp_port():
    """A loopback port free for both UDP and TCP (the resolver listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            try:
                with socket.socket() as t:
                    t.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def spki_sha256(cert):
    """The TLSA 3 1 1 association data of cert: SHA-256 of its DER SubjectPublicKeyInfo, in hex."""
    spki = subprocess.run(["sh", "-c", f"openssl x509 -in {cert} -pubkey -noout | openssl pkey -pubin -outform DER"],
                          capture_output=True, check=True).stdout
    return hashlib.sha256(spki).hexdigest()


def dns_query(port, name, qtype, ad=True):
    """(rcode, AD bit, answer count) of one query to the resolver, or None without an answer."""
    import dnslib
    q = dnslib.DNSRecord.question(name, qtype)
    q.header.ad = int(ad)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        try:
            s.sendto(q.pack(), ("127.0.0.1", port))
            r = dnslib.DNSRecord.parse(s.recv(65535))
        except OSError:
            return None
    return r.header.rcode, r.header.ad, len(r.rr)


class Unbound:
    """Unbound serving the zones (name -> zone text) as auth-zones for its own iterator, validating with
    the signed zones' DS records as trust anchors. The zone files are written into a directory that the
    unprivileged resolver (nobody, when the tests run as root) can read."""

    def __init__(self, zones, signed, corrupt=()):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="ktrelay-unbound-"))
        os.chmod(self.dir, 0o755)
        self.port = free_udp_tcp_port()
        anchors = []
        conf = [
            "server:",
            f"  interface: 127.0.0.1@{self.port}",
            "  do-daemonize: no",
            f"  username: \"{'nobody' if os.geteuid() == 0 else ''}\"",
            "  chroot: \"\"",
            f"  directory: \"{self.dir}\"",
            "  pidfile: \"\"",
            "  use-syslog: no",
            "  logfile: \"\"",
            "  verbosity: 1",
            "  val-log-level: 2",
            "  do-not-query-localhost: no",
            "  access-control: 127.0.0.0/8 allow",
            "  module-config: \"validator iterator\"",
            "  qname-minimisation: no",
            # RFC 6761 names are answered NXDOMAIN by Unbound unless told otherwise
            "  local-zone: \"test.\" nodefault",
        ]
        for name, text in zones.items():
            path = self.dir / f"{name}.zone"
            path.write_text(text)
            if name in signed:
                ksk = subprocess.run(["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", name], cwd=self.dir,
                                     capture_output=True, text=True, check=True).stdout.strip()
                zsk = subprocess.run(["ldns-keygen", "-a", "ECDSAP256SHA256", name], cwd=self.dir,
                                     capture_output=True, text=True, check=True).stdout.strip()
                subprocess.run(["ldns-signzone", str(path), ksk, zsk], cwd=self.dir, capture_output=True,
                               check=True)
                path = self.dir / f"{name}.zone.signed"
                # a record changed after signing: its signature no longer matches (a bogus answer)
                text = path.read_text()
                for old, new in corrupt:
                    assert old in text
                    text = text.replace(old, new)
                path.write_text(text)
                anchors.append(self.dir / f"{ksk}.ds")
            conf += ["auth-zone:", f"  name: \"{name}.\"", f"  zonefile: \"{path}\"", "  for-upstream: yes",
                     "  for-downstream: no", "  fallback-enabled: no"]
        conf[conf.index("server:") + 1:conf.index("server:") + 1] = [f"  trust-anchor-file: \"{a}\"" for a in anchors]
        (self.dir / "unbound.conf").write_text("\n".join(conf) + "\n")
        for f in self.dir.iterdir():
            os.chmod(f, 0o644)
        self.log = open(self.dir / "unbound.log", "w+")
        self.proc = subprocess.Popen([UNBOUND, "-d", "-c", str(self.dir / "unbound.conf")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while dns_query(self.port, next(iter(zones)), "SOA") is None:
            assert self.proc.poll() is None, (self.dir / "unbound.log").read_text()
            assert time.time() < deadline, "unbound did not answer"
            time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def resolver():
    yield from made_by_test(Unbound, end="stop")


def zone(origin, body):
    return (f"$ORIGIN {origin}.\n$TTL 300\n@ IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 300\n"
            f"@ IN NS ns.{origin}.\nns IN A 127.0.0.1\n" + body)


def message(subject):
    return BODY.replace(b"Subject: relay test", b"Subject: " + subject.encode())


def test_dane(nodes, resolver, sinks, tmp_path):
    cert, key = make_cert(tmp_path, cn="mx.dane.test")
    other_cert, _ = make_cert(tmp_path, name="other", cn="mx.dane.test")
    good, wrong = spki_sha256(cert), spki_sha256(other_cert)
    final = nodes("", services={"smtp": {"smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(cert),
                                         "smtpd_tls_key_file": str(key)}}).start()
    p = final.r.port()
    tlsa = f"_{p}._tcp"
    sink = sinks().start()                   # smtp-sink: no STARTTLS
    signed = zone("dane.test", f"sink IN MX 10 mxsink.dane.test.\nmxsink IN A 127.0.0.1\n"
                  f"_{sink.port}._tcp.mxsink IN TLSA 3 1 1 {good}\n" + "".join(
        f"{name} IN MX 10 mx{name if name != '@' else ''}.dane.test.\n"
        f"mx{name if name != '@' else ''} IN A 127.0.0.1\n" for name in ["@", "bad", "bogus", "notlsa", "unusable"])
        + f"{tlsa}.mx IN TLSA 3 1 1 {good}\n"
        + f"{tlsa}.mxbad IN TLSA 3 1 1 {wrong}\n"
        + f"{tlsa}.mxbogus IN TLSA 3 1 1 {good}\n"
        # PKIX-EE(1) is not usable for SMTP (RFC 7672 3.1.3): TLS required, nothing authenticated
        + f"{tlsa}.mxunusable IN TLSA 1 1 1 {good}\n")
    # a TLSA record of the plain zone says nothing: it is not signed
    plain = zone("plain.test", "@ IN MX 10 mx.plain.test.\nonly IN MX 10 mx.plain.test.\n"
                 f"mx IN A 127.0.0.1\n{tlsa}.mx IN TLSA 3 1 1 {wrong}\n")
    ub = resolver({"dane.test": signed, "plain.test": plain}, signed={"dane.test"})
    # the resolver validates what it should: AD for the signed zone, none for the unsigned one
    assert dns_query(ub.port, "dane.test", "MX")[:2] == (0, 1)
    assert dns_query(ub.port, f"{tlsa}.mx.dane.test", "TLSA") == (0, 1, 1)
    assert dns_query(ub.port, "plain.test", "MX")[:2] == (0, 0)

    front_dir = tmp_path / "front"
    front_dir.mkdir()
    labels = {"ok": "dane.test", "bad": "bad.dane.test", "notlsa": "notlsa.dane.test",
              "unusable": "unusable.dane.test", "plain": "plain.test", "only": "only.plain.test",
              "onlyok": "dane.test"}
    # nexthop "domain:port": an MX lookup, then that port (Postfix's transport(5) syntax)
    (front_dir / "transport").write_text("".join(f"{k}@localhost smtp:{v}:{p}\n" for k, v in labels.items()
                                                 if k != "onlyok") + f"onlyok@localhost smtp:[mx.dane.test]:{p}\n"
                                         + f"sink@localhost smtp:sink.dane.test:{sink.port}\n")
    (front_dir / "tls_policy").write_text(f"only.plain.test:{p} dane-only\n[mx.dane.test]:{p} dane-only\n")
    front = nodes("virtual_mailbox_domains = example.test\n"
                  f"transport_maps = texthash:{front_dir}/transport\n"
                  f"smtp_tls_policy_maps = texthash:{front_dir}/tls_policy\n"
                  "smtp_tls_security_level = dane\nsmtp_dns_support_level = dnssec\n"
                  f"ktrelay_dns_servers = 127.0.0.1:{ub.port}\nsmtp_tls_loglevel = 1\n").start()
    ids = {k: front.sendmail([f"{k}@localhost"], message(k)) for k in list(labels) + ["sink"]}

    def sent(k, host):
        return front.wait_log(rf"{ids[k]}: to=<{k}@localhost>, relay={host}\[127\.0\.0\.1\]:{p}, .*status=sent")

    def deferred(k, text):
        return front.wait_log(rf"{ids[k]}: to=<{k}@localhost>, relay=none, .*dsn=4\.7\.5, status=deferred \({text}\)")

    # TLSA 3 1 1 of the next hop's key: delivered, authenticated by DANE
    assert sent("ok", r"mx\.dane\.test"), front.log()
    assert front.wait_log(rf"Verified TLS connection established to mx\.dane\.test\[127\.0\.0\.1\]:{p}: TLSv1\.[23]")
    # dane-only for [mx.dane.test]: the A record is signed and the TLSA record matches
    assert sent("onlyok", r"mx\.dane\.test"), front.log()
    # a TLSA record of another key: the handshake is refused by OpenSSL's DANE check
    assert deferred("bad", "Server certificate not verified"), front.log()
    assert front.wait_log(rf"server certificate verification failed for mxbad\.dane\.test\[127\.0\.0\.1\]:{p}")
    # validated, no TLSA records: may (the self-signed certificate is "Untrusted", the mail goes)
    assert sent("notlsa", r"mxnotlsa\.dane\.test"), front.log()
    assert front.wait_log(rf"Untrusted TLS connection established to mxnotlsa\.dane\.test\[127\.0\.0\.1\]:{p}")
    # records, none usable: encrypt
    assert sent("unusable", r"mxunusable\.dane\.test"), front.log()
    # an unsigned zone: may, as Postfix; its TLSA record (of another key) is not even asked for
    assert sent("plain", r"mx\.plain\.test"), front.log()
    assert front.wait_log(rf"Untrusted TLS connection established to mx\.plain\.test\[127\.0\.0\.1\]:{p}")
    # usable TLSA records make TLS mandatory: a next hop without STARTTLS gets nothing in plaintext
    assert front.wait_log(rf"{ids['sink']}: to=<sink@localhost>, relay=none, .*dsn=4\.7\.4, status=deferred "
                          rf"\(TLS is required, but was not offered by host mxsink\.dane\.test\[127\.0\.0\.1\]:{sink.port}\)"), \
        front.log()
    assert sink.messages() == []
    # dane-only to the unsigned zone: never sent
    assert deferred("only", "client TLS configuration problem"), front.log()
    assert front.wait_log(r"warning: TLS policy lookup for only\.plain\.test/mx\.plain\.test: non DNSSEC destination")

    def stored(k):
        return [f for f in final.r.maildir_files("localhost/catchall/")
                if b"Subject: " + k.encode() + b"\r\n" in f.read_bytes()]
    for k in ("ok", "onlyok", "notlsa", "unusable", "plain"):
        assert len(wait_for(lambda: stored(k))) == 1, k
    for k in ("bad", "only"):
        assert stored(k) == []
    assert sorted(f.name for f in front.queue_files()) == sorted([ids["bad"], ids["only"], ids["sink"]])


def test_dane_tlsa_lookup_error(nodes, resolver, tmp_path):
    """A TLSA answer the resolver cannot validate (its signature no longer matches: the resolver answers
    SERVFAIL) defers with Postfix's "TLSA lookup error", for dane as for dane-only; nothing is sent."""
    cert, key = make_cert(tmp_path, cn="mx.bogus.test")
    good = spki_sha256(cert)
    final = nodes("", services={"smtp": {"smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(cert),
                                         "smtpd_tls_key_file": str(key)}}).start()
    p = final.r.port()
    signed = zone("bogus.test", f"@ IN MX 10 mx.bogus.test.\nmx IN A 127.0.0.1\n_{p}._tcp.mx IN TLSA 3 1 1 {good}\n")
    # after signing, the record's data changes: the signature no longer covers it
    ub = resolver({"bogus.test": signed}, signed={"bogus.test"}, corrupt=[(good, good[:-4] + "0000")])
    assert dns_query(ub.port, f"_{p}._tcp.mx.bogus.test", "TLSA")[0] == 2        # SERVFAIL
    assert dns_query(ub.port, "mx.bogus.test", "A")[:2] == (0, 1)
    front = nodes("virtual_mailbox_domains = example.test\n"
                  f"relayhost = bogus.test:{p}\n"
                  "smtp_tls_security_level = dane\nsmtp_dns_support_level = dnssec\n"
                  f"ktrelay_dns_servers = 127.0.0.1:{ub.port}\n").start()
    qid = front.sendmail(["x@localhost"], message("bogus"))
    assert front.wait_log(rf"{qid}: to=<x@localhost>, relay=none, .*dsn=4\.7\.5, status=deferred "
                          rf"\(TLSA lookup error for mx\.bogus\.test:{p}\)"), front.log()
    assert final.r.maildir_files("localhost/catchall/") == []


def make_ca_chain(d, name):
    """A CA and a leaf certificate for name signed by it; returns (chain file: leaf then CA, key, CA cert)."""
    def run(*args):
        subprocess.run(args, check=True, capture_output=True, cwd=d)
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=Test DANE TA", "-addext", "basicConstraints=critical,CA:true",
        "-addext", "keyUsage=critical,keyCertSign")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "leaf.key",
        "-out", "leaf.csr", "-subj", f"/CN={name}")
    (d / "ext.cnf").write_text(f"subjectAltName=DNS:{name}\n")
    run("openssl", "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "30", "-out", "leaf.pem", "-extfile", "ext.cnf")
    (d / "chain.pem").write_text((d / "leaf.pem").read_text() + (d / "ca.pem").read_text())
    return d / "chain.pem", d / "leaf.key", d / "ca.pem"


def test_dane_ta_usage_2(nodes, resolver, tmp_path):
    """DANE-TA(2): the record names the issuing CA (2 0 1, its whole certificate); the server's chain must
    lead to it and the certificate must carry the MX host's name, which OpenSSL checks."""
    chain, key, ca = make_ca_chain(tmp_path, "mx.ta.test")
    ca_der = subprocess.run(["openssl", "x509", "-in", str(ca), "-outform", "DER"], capture_output=True,
                            check=True).stdout
    ta = hashlib.sha256(ca_der).hexdigest()
    final = nodes("", services={"smtp": {"smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(chain),
                                         "smtpd_tls_key_file": str(key)}}).start()
    p = final.r.port()
    signed = zone("ta.test", f"@ IN MX 10 mx.ta.test.\nmx IN A 127.0.0.1\n_{p}._tcp.mx IN TLSA 2 0 1 {ta}\n"
                  f"other IN MX 10 mxother.ta.test.\nmxother IN A 127.0.0.1\n_{p}._tcp.mxother IN TLSA 2 0 1 {ta}\n")
    ub = resolver({"ta.test": signed}, signed={"ta.test"})
    front_dir = tmp_path / "front"
    front_dir.mkdir()
    (front_dir / "transport").write_text(f"a@localhost smtp:ta.test:{p}\nb@localhost smtp:other.ta.test:{p}\n")
    front = nodes("virtual_mailbox_domains = example.test\n"
                  f"transport_maps = texthash:{front_dir}/transport\n"
                  "smtp_tls_security_level = dane-only\nsmtp_dns_support_level = dnssec\n"
                  f"ktrelay_dns_servers = 127.0.0.1:{ub.port}\nsmtp_tls_loglevel = 1\n").start()
    qa = front.sendmail(["a@localhost"], message("ta"))
    qb = front.sendmail(["b@localhost"], message("ta-other"))
    assert front.wait_log(rf"{qa}: to=<a@localhost>, relay=mx\.ta\.test\[127\.0\.0\.1\]:{p}, .*status=sent"), front.log()
    assert front.wait_log(rf"Verified TLS connection established to mx\.ta\.test\[127\.0\.0\.1\]:{p}")
    # the same trust anchor, but the certificate is not for mxother.ta.test (nor other.ta.test)
    assert front.wait_log(rf"{qb}: to=<b@localhost>, relay=none, .*dsn=4\.7\.5, status=deferred "
                          r"\(Server certificate not verified\)"), front.log()
    assert front.wait_log(rf"server certificate verification failed for mxother\.ta\.test\[127\.0\.0\.1\]:{p}: "
                          r"num=62:hostname mismatch"), front.log()
