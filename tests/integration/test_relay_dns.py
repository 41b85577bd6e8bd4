"""Outbound next-hop lookups through the asynchronous resolver (c-ares): MX records by preference,
A fallback without MX, null MX, NXDOMAIN, SERVFAIL and timeouts, against a small DNS responder on
loopback that ktrelay is pointed at with ktrelay_dns_servers."""
import re
import socket
import struct
import threading

import pytest

from conftest import made_by_test
from test_relay import BODY, SINK, nodes, sinks, wait_for  # noqa: F401  (fixtures)

import os

pytestmark = pytest.mark.skipif(not os.path.exists(SINK), reason="smtp-sink (postfix package) not installed")

TYPES = {1: "A", 28: "AAAA", 15: "MX", 16: "TXT"}


def encode_name(name):
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


class DnsServer:
    """UDP DNS responder: records {(name, type): [values]} with type "A", "AAAA", "MX" ((pref, host)) or
    "TXT" (a string, or a list of the strings of one record);
    names in `nxdomain` answer NXDOMAIN, in `servfail` SERVFAIL, in `drop` nothing at all. Names
    with no record of the asked type answer NOERROR without answers (NODATA) when the name has some
    other record, else NXDOMAIN. Every question is kept in `queries` as (name, type)."""

    def __init__(self, records, nxdomain=(), servfail=(), drop=()):
        self.records = records
        self.nxdomain, self.servfail, self.drop = set(nxdomain), set(servfail), set(drop)
        self.queries = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            reply = self.answer(data)
            if reply:
                try:
                    self.sock.sendto(reply, peer)
                except OSError:
                    return             # closed meanwhile

    def answer(self, q):
        qid, _flags, qdcount = struct.unpack("!HHH", q[:6])
        if qdcount != 1:
            return None
        pos, labels = 12, []
        while q[pos]:
            labels.append(q[pos + 1:pos + 1 + q[pos]].decode().lower())
            pos += 1 + q[pos]
        qtype, _qclass = struct.unpack("!HH", q[pos + 1:pos + 5])
        question = q[12:pos + 5]
        name = ".".join(labels)
        tname = TYPES.get(qtype, str(qtype))
        self.queries.append((name, tname))
        if name in self.drop:
            return None
        answers = []
        rcode = 0
        if name in self.nxdomain:
            rcode = 3
        elif name in self.servfail:
            rcode = 2
        elif not any(n == name for n, _ in self.records):
            rcode = 3
        else:
            for value in self.records.get((name, tname), []):
                if tname == "A":
                    rdata = socket.inet_pton(socket.AF_INET, value)
                elif tname == "AAAA":
                    rdata = socket.inet_pton(socket.AF_INET6, value)
                elif tname == "TXT":
                    # one record: a string, or a list of strings that the reader joins
                    chunks = [value] if isinstance(value, str) else value
                    rdata = b"".join(bytes([len(c.encode())]) + c.encode() for c in chunks)
                else:
                    rdata = struct.pack("!H", value[0]) + encode_name(value[1])
                # the owner name is a pointer to the question (offset 12)
                answers.append(struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, len(rdata)) + rdata)
        header = struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, len(answers), 0, 0)
        return header + question + b"".join(answers)

    def close(self):
        self.running = False
        self.sock.close()


@pytest.fixture
def dns():
    yield from made_by_test(DnsServer)


def dns_cf(d):
    return f"ktrelay_dns_servers = 127.0.0.1:{d.port}\n"


def test_mx_by_preference_first_refuses_second_used(nodes, sinks, dns):
    sink = sinks().start()
    # listed in the reverse order: ktrelay must sort by preference. mx1 (127.0.0.2) has no listener.
    d = dns({("remote.test", "MX"): [(20, "mx2.remote.test"), (10, "mx1.remote.test")],
             ("mx1.remote.test", "A"): ["127.0.0.2"],
             ("mx2.remote.test", "A"): ["127.0.0.1"]})
    n = nodes(dns_cf(d) + f"relayhost = remote.test:{sink.port}\nsmtp_tls_loglevel = 1\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: to=<bob@remote.test>, relay=mx2\.remote\.test\[127\.0\.0\.1\]:{sink.port}, "
                      r".*dsn=2\.0\.0, status=sent"), n.log()
    assert ("remote.test", "MX") in d.queries
    assert ("mx1.remote.test", "A") in d.queries and ("mx2.remote.test", "A") in d.queries
    # the preferred exchanger was tried first and refused
    log = n.log()
    assert re.search(rf"connect to mx1\.remote\.test\[127\.0\.0\.2\]:{sink.port}: Connection refused", log), log
    assert log.index("mx1.remote.test[127.0.0.2]") < log.index(f"relay=mx2.remote.test[127.0.0.1]:{sink.port}")
    msgs = wait_for(lambda: sink.messages())
    assert len(msgs) == 1 and b"X-Rcpt-Args: <bob@remote.test>" in msgs[0]
    assert wait_for(lambda: n.queue_files() == [])


def test_no_mx_falls_back_to_address_records(nodes, sinks, dns):
    sink = sinks().start()
    d = dns({("plain.test", "A"): ["127.0.0.1"]})
    n = nodes(dns_cf(d) + f"transport_maps = inline:{{ plain.test=smtp:plain.test:{sink.port} }}\n").start()
    qid = n.sendmail(["bob@plain.test"], BODY)
    assert n.wait_log(rf"{qid}: to=<bob@plain.test>, relay=plain\.test\[127\.0\.0\.1\]:{sink.port}, .*status=sent"), \
        n.log()
    assert ("plain.test", "MX") in d.queries and ("plain.test", "A") in d.queries
    assert len(wait_for(lambda: sink.messages())) == 1


def test_bracketed_next_hop_skips_mx(nodes, sinks, dns):
    sink = sinks().start()
    # an MX exists but must not be used: [host] means the host's own address
    d = dns({("hop.test", "MX"): [(10, "elsewhere.test")], ("hop.test", "A"): ["127.0.0.1"],
             ("elsewhere.test", "A"): ["127.0.0.2"]})
    n = nodes(dns_cf(d) + f"relayhost = [hop.test]:{sink.port}\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: to=<bob@remote.test>, relay=hop\.test\[127\.0\.0\.1\]:{sink.port}, .*status=sent"), \
        n.log()
    assert ("hop.test", "A") in d.queries
    assert not [q for q in d.queries if q[1] == "MX"] and ("elsewhere.test", "A") not in d.queries


def test_nxdomain_bounces(nodes, dns):
    d = dns({}, nxdomain=["nowhere.test"])
    n = nodes(dns_cf(d)).start()
    qid = n.sendmail(["bob@nowhere.test"], BODY, sender="alice@example.test")
    assert n.wait_log(rf"{qid}: to=<bob@nowhere.test>, relay=none, .*dsn=5\.1\.2, status=bounced \(Host or domain "
                      r"name not found\. Name service error for name=nowhere\.test type=MX: Host not found\)"), n.log()
    assert ("nowhere.test", "MX") in d.queries
    assert n.wait_log(rf"{qid}: removed")
    box = n.d / "mail" / "example.test" / "alice" / "new"
    files = wait_for(lambda: list(box.iterdir()) if box.exists() else [])
    assert len(files) == 1
    dsn = files[0].read_text()
    assert "Final-Recipient: rfc822; bob@nowhere.test" in dsn and "Status: 5.1.2" in dsn


def test_null_mx_bounces(nodes, dns):
    d = dns({("nullmx.test", "MX"): [(0, ".")], ("nullmx.test", "A"): ["127.0.0.1"]})
    n = nodes(dns_cf(d)).start()
    qid = n.sendmail(["bob@nullmx.test"], BODY, sender="<>")
    assert n.wait_log(rf"{qid}: to=<bob@nullmx.test>, relay=none, .*dsn=5\.1\.10, status=bounced \(.*nullMX"), n.log()
    assert ("nullmx.test", "A") not in d.queries


def test_servfail_and_timeout_are_deferred(nodes, sinks, dns):
    sink = sinks().start()
    d = dns({("slow.test", "A"): ["127.0.0.1"]}, servfail=["broken.test"], drop=["slow.test"])
    n = nodes(dns_cf(d) + "minimal_backoff_time = 1h\nmaximal_backoff_time = 1h\n"
              f"transport_maps = inline:{{ slow.test=smtp:slow.test:{sink.port}, "
              f"broken.test=smtp:broken.test:{sink.port} }}\n").start()
    q1 = n.sendmail(["bob@broken.test"], BODY)
    q2 = n.sendmail(["bob@slow.test"], BODY)
    assert n.wait_log(rf"{q1}: to=<bob@broken.test>, relay=none, .*dsn=4\.4\.3, status=deferred \(Host or domain "
                      r"name not found\. Name service error for name=broken\.test type=MX: Host not found, try again"), \
        n.log()
    # c-ares retries on its own: the answer never comes, and the message waits in the queue
    assert n.wait_log(rf"{q2}: to=<bob@slow.test>, relay=none, .*dsn=4\.4\.3, status=deferred \(.*name=slow\.test "
                      r"type=MX: Host not found, try again \(Timeout", timeout=40), n.log()
    assert d.queries.count(("slow.test", "MX")) >= 2
    assert sorted(f.name for f in n.queue_files()) == sorted([q1, q2])
    assert sink.messages() == []
    # meanwhile the queue manager kept working: a bracketed literal next hop is delivered
    assert "bounced" not in n.log()


def test_lookup_in_flight_at_shutdown(nodes, dns):
    """A lookup that never gets an answer does not hold up a clean stop (exit 0, no leak report)."""
    d = dns({}, drop=["slow.test"])
    n = nodes(dns_cf(d) + "transport_maps = inline:{ slow.test=smtp:slow.test:25 }\n").start()
    qid = n.sendmail(["bob@slow.test"], BODY)
    assert wait_for(lambda: ("slow.test", "MX") in d.queries), n.log()
    log = n.stop()
    assert f"{qid}: to=<bob@slow.test>" not in log
    assert [f.name for f in n.queue_files()] == [qid]
