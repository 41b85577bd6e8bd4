"""Details of the outbound client that Postfix's smtp(8) has: a failed STARTTLS handshake at level
`may` retried in plaintext, random order among MX hosts of equal preference, the "mail for X loops
back to myself" checks (5.4.6), smtp_destination_recipient_limit and smtp_destination_rate_delay.
The next hops are a small SMTP server in this file that records every command of every connection
with its time, on loopback addresses the tests choose; names come from test_relay_dns's DNS server."""
import os
import random
import re
import time

import pytest

from conftest import free_port, made_by_test
from peers import TcpPeer, read_data_lines
from test_relay import BODY, nodes, wait_for  # noqa: F401  (fixture)
from test_relay_dns import DnsServer


class Conn:
    def __init__(self):
        self.commands = []          # (time.monotonic(), line without CRLF)
        self.ended = []             # time.monotonic() of each end of data


class Next(TcpPeer):
    """An SMTP server on (host, port). ehlo_name: the first word of its EHLO reply. starttls: offer
    STARTTLS, answer 220 and then send bytes that no TLS client accepts (a broken handshake)."""

    def __init__(self, host="127.0.0.1", port=None, ehlo_name="sink.test", starttls=False):
        super().__init__(host, port, backlog=64, reuse_addr=True)
        self.ehlo_name, self.starttls = ehlo_name, starttls
        self.conns = []
        self.open = self.max_open = 0
        self.listen()

    def session(self, s):
        c = Conn()
        with self.lock:
            self.conns.append(c)
            self.open += 1
            self.max_open = max(self.max_open, self.open)
        f = s.makefile("rb")
        try:
            s.sendall(b"220 " + self.ehlo_name.encode() + b" ESMTP\r\n")
            while True:
                line = f.readline()
                if not line:
                    break
                cmd = line.rstrip(b"\r\n").decode(errors="replace")
                with self.lock:
                    c.commands.append((time.monotonic(), cmd))
                verb = cmd[:4].upper()
                if verb == "EHLO":
                    ext = b"250-STARTTLS\r\n" if self.starttls else b""
                    s.sendall(b"250-" + self.ehlo_name.encode() + b"\r\n" + ext + b"250 PIPELINING\r\n")
                elif verb == "STAR":
                    s.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                    f.read1(4096)                   # the ClientHello
                    s.sendall(b"this is not TLS\r\n" * 4)
                    break
                elif verb == "DATA":
                    s.sendall(b"354 go\r\n")
                    if not read_data_lines(f)[1]:
                        break
                    with self.lock:
                        c.ended.append(time.monotonic())
                    s.sendall(b"250 2.0.0 Ok: queued\r\n")
                elif verb == "QUIT":
                    s.sendall(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    s.sendall(b"250 2.0.0 Ok\r\n")
        except OSError:
            pass
        finally:
            with self.lock:
                self.open -= 1
            s.close()

    def verbs(self):
        with self.lock:
            return [[cmd.split(":")[0].split(" ")[0].upper() for _, cmd in c.commands] for c in self.conns]

    def transactions(self):
        """[(time of MAIL, [RCPT addresses], end time or None)] over every connection."""
        out = []
        with self.lock:
            for c in self.conns:
                ends = list(c.ended)
                for t, cmd in c.commands:
                    if cmd.upper().startswith("MAIL FROM:"):
                        out.append([t, [], ends.pop(0) if ends else None])
                    elif cmd.upper().startswith("RCPT TO:"):
                        out[-1][1].append(cmd[9:-1])
        return sorted(out)


@pytest.fixture
def nexts():
    yield from made_by_test(Next)


def loopback_addresses(n):
    """n distinct addresses in 127.0.0.0/8 other than 127.0.0.1 (which is this host's), random so that
    test runs side by side do not meet."""
    net = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}."
    return [net + str(k) for k in random.sample(range(2, 250), n)]


def on_two_addresses(nexts, hosts, **kw):
    """One next hop per host, all on the same port (an MX lookup gives one port for every host)."""
    for _ in range(20):
        port = free_port()
        try:
            return [nexts(host=h, port=port, **kw) for h in hosts]
        except OSError:
            continue
    pytest.skip("no port free on every address")


def test_may_handshake_failure_retried_in_plaintext(nodes, nexts):
    nh = nexts(starttls=True)
    n = nodes(f"relayhost = [127.0.0.1]:{nh.port}\nsmtp_tls_security_level = may\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: to=<bob@remote.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{nh.port}, .*status=sent"), \
        n.log()
    assert n.wait_log(rf"TLS handshake with 127\.0\.0\.1\[127\.0\.0\.1\]:{nh.port} failed: .*; TLS is not required, "
                      r"retrying in plaintext"), n.log()
    verbs = nh.verbs()
    # the first connection asked for TLS, the second one went on without it, on the same server
    assert verbs[0] == ["EHLO", "STARTTLS"], verbs
    assert verbs[1][:5] == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"] or verbs[1][:4] == ["EHLO", "MAIL", "RCPT", "DATA"], verbs
    assert "deferred" not in n.log()


def test_encrypt_handshake_failure_is_not_retried_in_plaintext(nodes, nexts):
    nh = nexts(starttls=True)
    n = nodes(f"relayhost = [127.0.0.1]:{nh.port}\nsmtp_tls_security_level = encrypt\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: to=<bob@remote.test>, .*status=deferred \(TLS handshake with"), n.log()
    assert all("MAIL" not in v for v in nh.verbs()), nh.verbs()


def test_equal_preference_mx_hosts_in_random_order(nodes, nexts):
    ha, hb, hc = loopback_addresses(3)
    a, b = on_two_addresses(nexts, [ha, hb])
    backup = nexts(host=hc, port=a.port)
    dns = DnsServer({("shuf.test", "MX"): [(10, "a.shuf.test"), (10, "b.shuf.test"), (20, "c.shuf.test")],
                     ("a.shuf.test", "A"): [ha], ("b.shuf.test", "A"): [hb], ("c.shuf.test", "A"): [hc]})
    n = nodes(f"ktrelay_dns_servers = 127.0.0.1:{dns.port}\n"
              f"transport_maps = inline:{{ shuf.test=smtp:shuf.test:{a.port} }}\n"
              # one message per connection, so that each message draws the order anew
              "smtp_connection_reuse_count_limit = 1\n").start()
    ids = [n.sendmail([f"u{k}@shuf.test"], BODY) for k in range(16)]
    assert n.wait_log(r"to=<u\d+@shuf\.test>, .*status=sent", count=16, timeout=60), n.log()
    got_a, got_b = len(a.transactions()), len(b.transactions())
    # both hosts of the best preference get mail (all to one: probability 2 * 2^-16), the backup none
    assert got_a + got_b == 16 and got_a > 0 and got_b > 0, (got_a, got_b)
    assert backup.transactions() == []
    assert len(ids) == 16


def test_mx_that_is_this_host_loops_back(nodes):
    """inet_interfaces = loopback-only (the tests' default): 127.0.0.1 is ours. The best MX being us,
    and no MX of lower preference number, is a loop: 5.4.6, as Postfix (port 25 only)."""
    dns = DnsServer({("loop.test", "MX"): [(10, "mx.loop.test"), (20, "backup.loop.test")],
                     ("mx.loop.test", "A"): ["127.0.0.1"], ("backup.loop.test", "A"): ["127.0.0.154"]})
    n = nodes(f"ktrelay_dns_servers = 127.0.0.1:{dns.port}\n").start()
    qid = n.sendmail(["bob@loop.test"], BODY)
    assert n.wait_log(rf"{qid}: to=<bob@loop\.test>, relay=none, delay=\d+, dsn=5\.4\.6, status=bounced "
                      r"\(mail for loop\.test loops back to myself\)"), n.log()
    # the sender hears of it (alice is local on this node)
    dsn = wait_for(lambda: n.r.maildir_files("example.test/alice/"))
    assert len(dsn) == 1 and "mail for loop.test loops back to myself" in dsn[0].read_text()


def test_ehlo_with_my_own_name_loops_back(nodes, nexts):
    """A server at port 25 that answers EHLO with our myhostname is us (a forwarding loop)."""
    if os.geteuid() != 0:
        pytest.skip("port 25 needs root")
    (host,) = loopback_addresses(1)
    try:
        nh = nexts(host=host, port=25, ehlo_name="mx.example.test")
    except OSError:
        pytest.skip(f"{host}:25 is taken")
    h = re.escape(host)
    n = nodes(f"transport_maps = inline:{{ ehlo.test=smtp:[{host}]:25 }}\n").start()
    qid = n.sendmail(["bob@ehlo.test"], BODY)
    assert n.wait_log(rf"warning: host {h}\[{h}\] greeted me with my own hostname mx\.example\.test"), n.log()
    assert n.wait_log(rf"warning: host {h}\[{h}\] replied to HELO/EHLO with my own hostname mx\.example\.test"), \
        n.log()
    assert n.wait_log(rf"{qid}: to=<bob@ehlo\.test>, relay=none, .*dsn=5\.4\.6, status=bounced \(mail for "
                      rf"\[{h}\]:25 loops back to myself\)"), n.log()
    assert nh.transactions() == []
    # the client took its leave with QUIT
    assert wait_for(lambda: "QUIT" in nh.verbs()[0]), nh.verbs()
    # another port is not checked (Postfix: content filters and the like live there)
    other = nexts(host=host, ehlo_name="mx.example.test")
    n2 = nodes(f"transport_maps = inline:{{ ehlo.test=smtp:[{host}]:{other.port} }}\n").start()
    qid2 = n2.sendmail(["bob@ehlo.test"], BODY)
    assert n2.wait_log(rf"{qid2}: to=<bob@ehlo\.test>, .*status=sent"), n2.log()


def test_recipient_limit_splits_transactions(nodes, nexts):
    nh = nexts()
    n = nodes(f"relayhost = [127.0.0.1]:{nh.port}\n").start()
    rcpts = [f"r{k}@remote.test" for k in range(120)]
    qid = n.sendmail(rcpts, BODY)
    assert n.wait_log(rf"{qid}: to=<r\d+@remote\.test>, .*status=sent", count=120), n.log()
    tx = nh.transactions()
    # smtp_destination_recipient_limit = $default_destination_recipient_limit = 50
    assert sorted(len(r) for _, r, _ in tx) == [20, 50, 50], [len(r) for _, r, _ in tx]
    assert sorted(a for _, r, _ in tx for a in r) == sorted(rcpts)
    assert n.wait_log(rf"{qid}: removed"), n.log()


def test_recipient_limit_setting(nodes, nexts):
    nh = nexts()
    n = nodes(f"relayhost = [127.0.0.1]:{nh.port}\nsmtp_destination_recipient_limit = 2\n").start()
    qid = n.sendmail([f"r{k}@remote.test" for k in range(5)], BODY)
    assert n.wait_log(rf"{qid}: to=<r\d+@remote\.test>, .*status=sent", count=5), n.log()
    assert sorted(len(r) for _, r, _ in nh.transactions()) == [1, 2, 2]


def test_rate_delay_spaces_deliveries(nodes, nexts):
    nh = nexts()
    n = nodes(f"relayhost = [127.0.0.1]:{nh.port}\nsmtp_destination_rate_delay = 2s\n").start()
    ids = [n.sendmail([f"u{k}@remote.test"], BODY) for k in range(3)]
    assert n.wait_log(r"to=<u\d@remote\.test>, .*status=sent", count=3, timeout=30), n.log()
    tx = nh.transactions()
    assert len(tx) == 3 and len(ids) == 3
    # one delivery at a time, and each starts at least the delay after the previous one ended (a cached
    # connection may still be saying QUIT when the next one opens)
    for (_, _, end), (start, _, _) in zip(tx, tx[1:]):
        assert start - end >= 2.0, [(s, e) for s, _, e in tx]
