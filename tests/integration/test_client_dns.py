"""Client checks through DNS against a DNS server on loopback that the tests
run (python3-dnslib): reverse names forward-confirmed as Postfix does
(name[addr] in logs and Received:), reject_unknown_client_hostname and
_reverse_client_hostname, DNS lists (reject_rbl_client with =filters,
reject_rhsbl_client/_reverse_client/_sender/_helo, permit_dnswl_client,
rbl_reply_maps and Postfix's default reply), reject_unknown_sender_domain and
reject_unknown_helo_hostname; answers cached for their TTL; a slow server
holds up only the session that waits for it; a failing one counts as not
listed, with a log line."""
import socket
import threading

import pytest

dnslib = pytest.importorskip("dnslib")
from dnslib import DNSRecord, QTYPE, RCODE, RR  # noqa: E402

from conftest import SmtpConn, after_trace  # noqa: E402


class DnsServer:
    """UDP DNS server. zone: {(name, "A"|"AAAA"|"PTR"|"TXT"|"MX"): [rdata text, ...]} (TTL 300);
    servfail / drop: names answered SERVFAIL or never; hold: names whose answers wait for release()."""

    def __init__(self, zone, servfail=(), drop=(), hold=()):
        self.zone = {(n.lower().rstrip("."), t): v for (n, t), v in zone.items()}
        self.servfail, self.drop, self.hold = set(servfail), set(drop), set(hold)
        self.queries = []
        self.held = []
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def count(self, name, qtype):
        with self.lock:
            return sum(1 for q in self.queries if q == (name, qtype))

    def release(self):
        with self.lock:
            self.released.set()
            held, self.held = self.held, []
        for data, peer in held:
            self.sock.sendto(data, peer)

    def serve(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            q = DNSRecord.parse(data)
            name = str(q.q.qname).lower().rstrip(".")
            qtype = QTYPE[q.q.qtype]
            with self.lock:
                self.queries.append((name, qtype))
            if name in self.drop:
                continue
            r = q.reply()
            if name in self.servfail:
                r.header.rcode = RCODE.SERVFAIL
            elif (name, qtype) in self.zone:
                for v in self.zone[(name, qtype)]:
                    text = f'"{v}"' if qtype == "TXT" else v
                    r.add_answer(*RR.fromZone(f"{name}. 300 IN {qtype} {text}"))
            elif not any(n == name for n, _ in self.zone):
                r.header.rcode = RCODE.NXDOMAIN
                r.add_auth(*RR.fromZone("test. 300 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 120"))
            out = r.pack()
            with self.lock:
                if name in self.hold and not self.released.is_set():
                    self.held.append((out, peer))
                    continue
            self.sock.sendto(out, peer)


def client(port, source):
    return SmtpConn(port, src=source, timeout=30)


def ehlo_mail(c, helo="client.example", sender="s@good.example"):
    assert c.cmd(f"EHLO {helo}").startswith("250-")
    assert c.cmd(f"MAIL FROM:<{sender}>") == "250 2.1.0 Ok"


def mailing(port, source, **kw):
    """A client from source, past EHLO and MAIL (ehlo_mail's arguments), ready for RCPT."""
    c = client(port, source)
    ehlo_mail(c, **kw)
    return c


def rev(addr):
    return ".".join(reversed(addr.split("."))) + ".in-addr.arpa"


ZONE = {
    # 127.0.0.2: PTR confirmed by A
    (rev("127.0.0.2"), "PTR"): ["mail.client.example."],
    ("mail.client.example", "A"): ["127.0.0.2"],
    # 127.0.0.3: PTR whose name points elsewhere
    (rev("127.0.0.3"), "PTR"): ["liar.example."],
    ("liar.example", "A"): ["192.0.2.1"],
    # 127.0.0.4: no PTR at all (NXDOMAIN)
    # DNS lists
    ("5.0.0.127.zen.test", "A"): ["127.0.0.2"],
    ("5.0.0.127.zen.test", "TXT"): ["listed: see http://zen.test/q?127.0.0.5"],
    ("6.0.0.127.filt.test", "A"): ["127.0.0.10"],
    ("7.0.0.127.filt.test", "A"): ["127.0.0.5"],
    ("9.0.0.127.zen.test", "A"): ["127.0.0.2"],
    ("9.0.0.127.wl.test", "A"): ["127.0.2.1"],
    ("bad.example.dbl.test", "A"): ["127.0.1.2"],
    ("mail.client.example.dbl.test", "A"): ["127.0.1.2"],
    ("liar.example.dbl.test", "A"): ["127.0.1.2"],
    # sender and HELO domains
    ("good.example", "MX"): ["10 mx.good.example."],
    ("aonly.example", "A"): ["192.0.2.9"],
    ("nullmx.example", "MX"): ["0 ."],
    ("bad.example", "A"): ["192.0.2.10"],
    ("slow.example", "A"): ["192.0.2.11"],
}


@pytest.fixture
def dns():
    servers = []

    def start(**kw):
        d = DnsServer(ZONE, **kw)
        servers.append(d)
        return d
    yield start
    for d in servers:
        d.release()
        d.sock.close()


def dns_relay(relay_factory, d, extra=""):
    return relay_factory(f"smtpd_peername_lookup = yes\nktrelay_dns_servers = 127.0.0.1:{d.port}\n" + extra)


def rcpt(c, to="someone@localhost"):
    return c.cmd(f"RCPT TO:<{to}>")


def test_reverse_names_forward_confirmed(relay_factory, dns):
    d = dns()
    r = dns_relay(relay_factory, d)
    c = mailing(r.port(), "127.0.0.2")
    assert rcpt(c) == "250 2.1.5 Ok"
    assert c.cmd("DATA").startswith("354 ")
    c.send(b"Subject: t\r\n\r\nx\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as ")
    c.cmd("QUIT")
    assert after_trace(r.maildir_files()[0].read_bytes()).startswith(
        b"Received: from client.example (mail.client.example [127.0.0.2])\r\n")
    assert r.wait_log("connect from mail.client.example[127.0.0.2]")
    assert r.wait_log("client=mail.client.example[127.0.0.2]")
    assert r.wait_log("disconnect from mail.client.example[127.0.0.2] ehlo=1 mail=1 rcpt=1 data=1 quit=1")
    # a PTR name that does not resolve back is not the client's name
    client(r.port(), "127.0.0.3").cmd("QUIT")
    assert r.wait_log("warning: hostname liar.example does not resolve to address 127.0.0.3")
    assert r.wait_log("connect from unknown[127.0.0.3]")
    # no PTR
    client(r.port(), "127.0.0.4").cmd("QUIT")
    assert r.wait_log("connect from unknown[127.0.0.4]")
    # cached for the TTL: a second connection asks nothing again
    client(r.port(), "127.0.0.2").cmd("QUIT")
    assert r.wait_log("disconnect from mail.client.example[127.0.0.2] quit=1")
    assert d.count(rev("127.0.0.2"), "PTR") == 1
    assert d.count("mail.client.example", "A") == 1


def test_reject_unknown_client_hostnames(relay_factory, dns):
    d = dns()
    r = dns_relay(relay_factory, d, "smtpd_client_restrictions = reject_unknown_client_hostname\n"
                                    "smtpd_helo_restrictions = reject_unknown_reverse_client_hostname\n")
    ok = mailing(r.port(), "127.0.0.2")
    assert rcpt(ok) == "250 2.1.5 Ok"
    liar = mailing(r.port(), "127.0.0.3")
    assert rcpt(liar) == "450 4.7.25 Client host rejected: cannot find your hostname, [127.0.0.3]"
    assert r.wait_log("NOQUEUE: reject: RCPT from unknown[127.0.0.3]: 450 4.7.25 Client host rejected: cannot find "
                      "your hostname, [127.0.0.3]; from=<s@good.example> to=<someone@localhost> proto=ESMTP "
                      "helo=<client.example>")
    r2 = dns_relay(relay_factory, d, "smtpd_client_restrictions = reject_unknown_reverse_client_hostname\n")
    liar = mailing(r2.port(), "127.0.0.3")
    assert rcpt(liar) == "250 2.1.5 Ok"     # it has a PTR name, confirmed or not
    none = mailing(r2.port(), "127.0.0.4")
    assert rcpt(none) == "450 4.7.25 Client host rejected: cannot find your reverse hostname, [127.0.0.4]"


def test_rbl_client_default_reply_and_filters(relay_factory, dns):
    d = dns()
    r = dns_relay(relay_factory, d, "smtpd_client_restrictions = reject_rbl_client zen.test, "
                                    "reject_rbl_client filt.test=127.0.0.[4..6]\n")
    c = mailing(r.port(), "127.0.0.5")
    assert rcpt(c) == ("554 5.7.1 Service unavailable; Client host [127.0.0.5] blocked using zen.test; "
                       "listed: see http://zen.test/q?127.0.0.5")
    assert r.wait_log("NOQUEUE: reject: RCPT from unknown[127.0.0.5]: 554 5.7.1 Service unavailable; Client host "
                      "[127.0.0.5] blocked using zen.test; listed: see http://zen.test/q?127.0.0.5; "
                      "from=<s@good.example> to=<someone@localhost>")
    # filt.test answers 127.0.0.10 for .6: outside the filter, not listed
    c6 = mailing(r.port(), "127.0.0.6")
    assert rcpt(c6) == "250 2.1.5 Ok"
    # .7 gets 127.0.0.5: inside; no TXT record, so no reason
    c7 = mailing(r.port(), "127.0.0.7")
    assert rcpt(c7) == "554 5.7.1 Service unavailable; Client host [127.0.0.7] blocked using filt.test"
    # the answers are cached: a second recipient asks nothing again
    assert rcpt(c7) == "554 5.7.1 Service unavailable; Client host [127.0.0.7] blocked using filt.test"
    assert d.count("7.0.0.127.filt.test", "A") == 1
    # unlisted client
    c8 = mailing(r.port(), "127.0.0.8")
    assert rcpt(c8) == "250 2.1.5 Ok"


def test_rbl_reply_maps(relay_factory, dns, tmp_path):
    d = dns()
    (tmp_path / "rbl_reply").write_text(
        "zen.test 550 Go away $client_address, see $rbl_domain${rbl_reason?: $rbl_reason}\n")
    r = dns_relay(relay_factory, d, "smtpd_client_restrictions = reject_rbl_client zen.test\n"
                                    f"rbl_reply_maps = texthash:{tmp_path}/rbl_reply\n")
    c = mailing(r.port(), "127.0.0.5")
    assert rcpt(c) == "550 5.7.1 Go away 127.0.0.5, see zen.test: listed: see http://zen.test/q?127.0.0.5"


def test_permit_dnswl_client(relay_factory, dns):
    d = dns()
    r = dns_relay(relay_factory, d, "smtpd_client_restrictions = permit_dnswl_client wl.test, "
                                    "reject_rbl_client zen.test\n")
    c = client(r.port(), "127.0.0.9")       # on both lists: the allow list comes first
    ehlo_mail(c)
    assert rcpt(c) == "250 2.1.5 Ok"
    # never a way around relay control
    assert rcpt(c, "x@remote.example") == "554 5.7.1 <x@remote.example>: Relay access denied"


def test_rhsbl(relay_factory, dns):
    d = dns()
    r = dns_relay(relay_factory, d, "smtpd_sender_restrictions = reject_rhsbl_sender dbl.test\n"
                                    "smtpd_helo_restrictions = reject_rhsbl_helo dbl.test\n")
    c = mailing(r.port(), "127.0.0.8", sender="s@bad.example")
    assert rcpt(c) == "554 5.7.1 Service unavailable; Sender address [bad.example] blocked using dbl.test"
    c.cmd("RSET")
    ehlo_mail(c, helo="bad.example")
    assert rcpt(c) == "554 5.7.1 Service unavailable; Helo command [bad.example] blocked using dbl.test"
    ehlo_mail(c, helo="client.example")
    assert rcpt(c) == "250 2.1.5 Ok"
    r2 = dns_relay(relay_factory, d, "smtpd_client_restrictions = reject_rhsbl_client dbl.test, "
                                     "reject_rhsbl_reverse_client dbl.test\n")
    c = client(r2.port(), "127.0.0.2")      # confirmed name mail.client.example is listed
    ehlo_mail(c)
    assert rcpt(c) == ("554 5.7.1 Service unavailable; Client host [mail.client.example] blocked using "
                       "dbl.test")
    c = client(r2.port(), "127.0.0.3")      # unconfirmed liar.example is listed
    ehlo_mail(c)
    assert rcpt(c) == ("554 5.7.1 Service unavailable; Unverified Client host [liar.example] blocked using "
                       "dbl.test")


def test_unknown_sender_domain_and_helo(relay_factory, dns):
    d = dns()
    r = dns_relay(relay_factory, d, "smtpd_sender_restrictions = reject_unknown_sender_domain\n"
                                    "smtpd_helo_restrictions = reject_unknown_helo_hostname\n")
    c = mailing(r.port(), "127.0.0.8", helo="bad.example", sender="s@nx.example")
    assert rcpt(c) == "450 4.1.8 <s@nx.example>: Sender address rejected: Domain not found"
    c.cmd("RSET")
    ehlo_mail(c, helo="bad.example", sender="s@nullmx.example")
    assert rcpt(c) == ("550 5.7.27 <s@nullmx.example>: Sender address rejected: Domain nullmx.example does not "
                       "accept mail (nullMX)")
    c.cmd("RSET")
    for sender in ("s@good.example", "s@aonly.example", "<>"):
        assert c.cmd("EHLO bad.example").startswith("250-")
        assert c.cmd(f"MAIL FROM:<{sender.strip('<>')}>") == "250 2.1.0 Ok"
        assert rcpt(c) == "250 2.1.5 Ok"
        c.cmd("RSET")
    ehlo_mail(c, helo="nohost.example")
    assert rcpt(c) == "450 4.7.1 <nohost.example>: Helo command rejected: Host not found"
    c.cmd("RSET")
    ehlo_mail(c, helo="[192.0.2.1]")          # address literals are not looked up
    assert rcpt(c) == "250 2.1.5 Ok"


def test_slow_server_holds_only_its_session(relay_factory, dns):
    d = dns(hold={"5.0.0.127.zen.test"})
    r = dns_relay(relay_factory, d, "mynetworks = 127.0.0.1/32\n"
                                    "smtpd_client_restrictions = permit_mynetworks, reject_rbl_client zen.test\n")
    slow = mailing(r.port(), "127.0.0.5")
    slow.send("RCPT TO:<someone@localhost>\r\n")
    deadline = 50
    while d.count("5.0.0.127.zen.test", "A") == 0 and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert d.count("5.0.0.127.zen.test", "A") >= 1
    # meanwhile another client goes through a whole transaction
    fast = mailing(r.port(), "127.0.0.1")
    assert rcpt(fast) == "250 2.1.5 Ok"
    assert fast.cmd("DATA").startswith("354 ")
    fast.send(b"Subject: t\r\n\r\nx\r\n.\r\n")
    assert fast.reply().startswith("250 2.0.0 Ok: queued as ")
    # the waiting session has not answered yet
    slow.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        slow.sock.recv(100)
    slow.sock.setblocking(True)
    d.release()
    assert slow.reply() == ("554 5.7.1 Service unavailable; Client host [127.0.0.5] blocked using zen.test; "
                            "listed: see http://zen.test/q?127.0.0.5")


def test_failing_server_counts_as_not_listed(relay_factory, dns):
    d = dns(servfail={"8.0.0.127.zen.test"}, drop={"8.0.0.127.dead.test"})
    r = dns_relay(relay_factory, d, "smtpd_client_restrictions = reject_rbl_client zen.test, "
                                    "reject_rbl_client dead.test\n")
    c = mailing(r.port(), "127.0.0.8")
    assert rcpt(c) == "250 2.1.5 Ok"
    assert r.wait_log("warning: 8.0.0.127.zen.test: RBL lookup error: server failure (counted as not listed)")
    assert r.wait_log("warning: 8.0.0.127.dead.test: RBL lookup error: timeout (counted as not listed)")


def test_bad_dns_list_is_a_config_error(tmp_path):
    import subprocess
    from conftest import BIN
    (tmp_path / "main.cf").write_text("smtpd_client_restrictions = reject_rbl_client zen.test=127.0.0.[2..x]\n"
                                      "smtpd_relay_restrictions = reject_unauth_destination\n")
    p = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 78     # EX_CONFIG
    assert "bad DNS list" in p.stdout + p.stderr
