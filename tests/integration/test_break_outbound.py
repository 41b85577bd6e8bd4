"""Hostile next hops against the outbound client: malformed AUTH exchanges, huge replies, a hop that
advertises an extension and then refuses it, UTF-8 where the next hop cannot take it. The next hop is a
scripted SMTP server in this file that records every command it gets; each test gives it its replies.
Every check is on exact log lines, DSN codes and the commands the hop received, and no credential may
appear in the log, in clear or in base64."""
import base64
import threading

import pytest

from conftest import SmtpConn, made_by_test
from peers import TcpPeer, read_data_lines
from test_relay import BODY, nodes, wait_for  # noqa: F401  (fixture)
from test_relay_dns import dns  # noqa: F401  (fixture)
from test_mta_sts import pki, policy_servers  # noqa: F401  (fixtures)

PASSWORD = "s3cr3t-Pa55"
USER = "relayuser"


class Hop(TcpPeer):
    """An SMTP server on 127.0.0.1. ehlo: the EHLO reply's extension lines; script(cmd) may return
    the reply bytes for a command (None: the default, 250), b"." standing for the end of data; each
    command is recorded."""

    def __init__(self, ehlo=(b"PIPELINING",), script=None):
        super().__init__()
        self.ehlo, self.script = list(ehlo), script or (lambda cmd: None)
        self.commands = []
        self.listen()

    def session(self, s):
        f = s.makefile("rb")
        try:
            s.sendall(b"220 hop.test ESMTP\r\n")
            while True:
                line = f.readline()
                if not line:
                    break
                cmd = line.rstrip(b"\r\n")
                with self.lock:
                    self.commands.append(cmd)
                r = self.script(cmd)
                if r is not None:
                    s.sendall(r)
                    continue
                verb = cmd[:4].upper()
                if verb == b"EHLO":
                    lines = [b"hop.test"] + self.ehlo
                    s.sendall(b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]) + b"250 " + lines[-1] + b"\r\n")
                elif verb == b"DATA":
                    s.sendall(b"354 go\r\n")
                    read_data_lines(f)
                    with self.lock:
                        self.commands.append(b".")
                    s.sendall(self.script(b".") or b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    s.sendall(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    s.sendall(b"250 2.0.0 Ok\r\n")
        except OSError:
            pass
        finally:
            s.close()

    def received(self):
        with self.lock:
            return list(self.commands)


@pytest.fixture
def hops():
    yield from made_by_test(Hop)


def auth_node(nodes, tmp_path, hop, extra=""):
    pw = tmp_path / "sasl_passwd"
    pw.write_text(f"[127.0.0.1]:{hop.port} {USER}:{PASSWORD}\n")
    return nodes(f"relayhost = [127.0.0.1]:{hop.port}\nsmtp_sasl_auth_enable = yes\n"
                 f"smtp_sasl_password_maps = texthash:{pw}\n"
                 # no TLS on this hop: allow the password in the clear for the test
                 "smtp_sasl_security_options = noanonymous\n" + extra).start()


def no_secret_in(log):
    for s in (PASSWORD, base64.b64encode(PASSWORD.encode()).decode(),
              base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()):
        assert s not in log, s




def after_auth(reply):
    """A script that answers every command from AUTH on (but QUIT) with reply."""
    st = {"auth": False}

    def script(cmd):
        if cmd.upper().startswith(b"EHLO"):
            st["auth"] = False      # a new connection
        st["auth"] = st["auth"] or cmd.upper().startswith(b"AUTH")
        return reply if st["auth"] and cmd.upper() != b"QUIT" else None
    return script


SASL_FAILED = r"SASL authentication failed; cannot authenticate to server 127\.0\.0\.1\[127\.0\.0\.1\]: "


def test_login_challenge_not_base64_sends_no_password(nodes, hops, tmp_path):
    """Postfix (Cyrus) decodes each challenge: one that is not base64 ends the exchange with "*", 4.7.0."""
    hop = hops(ehlo=[b"PIPELINING", b"AUTH LOGIN"], script=after_auth(b"334 not base64 at all!!\r\n"))
    n = auth_node(nodes, tmp_path, hop)
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: to=<bob@remote\.test>, relay=none, delay=\d+, dsn=4\.7\.0, status=deferred "
                      rf"\({SASL_FAILED}malformed SASL challenge from server\)"), n.log()
    got = wait_for(lambda: len(hop.received()) >= 3 and hop.received(), timeout=5) or hop.received()
    assert got[:3] == [b"EHLO mx.example.test", b"AUTH LOGIN", b"*"], got
    assert b"MAIL" not in b" ".join(got)
    no_secret_in(n.log())
    assert n.queue_files()[0].name == qid


def test_login_334_loop_ends_after_the_password(nodes, hops, tmp_path):
    """A server that keeps sending valid challenges gets the user name, the password, then "*": 4.7.0."""
    hop = hops(ehlo=[b"PIPELINING", b"AUTH LOGIN"], script=after_auth(b"334 VXNlcm5hbWU6\r\n"))
    n = auth_node(nodes, tmp_path, hop)
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: to=<bob@remote\.test>, relay=none, delay=\d+, dsn=4\.7\.0, status=deferred "
                      r"\(SASL authentication failed; server 127\.0\.0\.1\[127\.0\.0\.1\] said: 334 VXNlcm5hbWU6\)"), \
        n.log()
    got = wait_for(lambda: len(hop.received()) >= 5 and hop.received(), timeout=5) or hop.received()
    assert got[:5] == [b"EHLO mx.example.test", b"AUTH LOGIN", base64.b64encode(USER.encode()),
                       base64.b64encode(PASSWORD.encode()), b"*"], got
    no_secret_in(n.log())


def test_plain_answered_with_a_challenge(nodes, hops, tmp_path):
    """PLAIN goes with its initial response; a 334 after it cannot be answered: "*", 4.7.0, deferred."""
    hop = hops(ehlo=[b"PIPELINING", b"AUTH PLAIN LOGIN"], script=after_auth(b"334 \r\n"))
    n = auth_node(nodes, tmp_path, hop)
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: to=<bob@remote\.test>, relay=none, delay=\d+, dsn=4\.7\.0, status=deferred"), n.log()
    got = wait_for(lambda: len(hop.received()) >= 3 and hop.received(), timeout=5) or hop.received()
    assert got[1].startswith(b"AUTH PLAIN ") and got[2] == b"*", got
    no_secret_in(n.log())



def test_huge_multiline_reply_defers_and_the_server_lives_on(nodes, hops):
    """2 MB of EHLO reply lines: the client stops reading at its reply limit and defers; the next
    message, to a sane hop, goes."""
    hop = hops(ehlo=[b"X" * 1000] * 2000)
    good = hops()
    n = nodes(f"relayhost = [127.0.0.1]:{hop.port}\n"
              f"transport_maps = inline:{{ good.test=smtp:[127.0.0.1]:{good.port} }}\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: to=<bob@remote\.test>, relay=none, delay=\d+, dsn=4\.0\.0, status=deferred "
                      rf"\(malformed reply from 127\.0\.0\.1\[127\.0\.0\.1\]:{hop.port}\)"), n.log()
    qid2 = n.sendmail(["carol@good.test"], BODY)
    assert n.wait_log(rf"{qid2}: to=<carol@good\.test>, .*status=sent"), n.log()
    assert [f.name for f in n.queue_files()] == [qid]



def relay_node(nodes, hop, extra=""):
    return nodes(f"relayhost = [127.0.0.1]:{hop.port}\nmynetworks = 127.0.0.0/8\n" + extra).start()


def submit(n, mail, rcpts, body=b"Subject: x\r\n\r\nhi\r\n"):
    """One transaction over SMTP; the RCPT replies."""
    c = SmtpConn(n.r.port())
    c.ehlo()
    c.cmd(mail, 250)
    replies = [c.cmd(r) for r in rcpts]
    if any(r.startswith("250") for r in replies):
        c.cmd("DATA", 354)
        c.send(body + b".\r\n")
        c.expect(250)
    c.quit()
    return replies


def test_utf8_orcpt_to_a_hop_without_smtputf8(nodes, hops):
    """RFC 6533 3: a "utf-8" ORCPT in raw UTF-8 goes to a next hop without SMTPUTF8 as
    utf-8-addr-xtext (\\x{HEX}), never as 8-bit bytes; the message itself is ASCII, so it goes."""
    hop = hops(ehlo=[b"PIPELINING", b"8BITMIME", b"DSN"])
    n = relay_node(nodes, hop)
    replies = submit(n, "MAIL FROM:<alice@example.test> SMTPUTF8",
                     ["RCPT TO:<bob@remote.test> ORCPT=utf-8;b\u00f6b\u20ac@remote.test",
                      "RCPT TO:<carol@remote.test> ORCPT=rfc822;c\u00f6b@remote.test"])
    # raw UTF-8 belongs only to the utf-8 type
    assert replies == ["250 2.1.5 Ok", "501 5.5.4 Error: Bad ORCPT parameter syntax"]
    assert n.wait_log(r"to=<bob@remote\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*status=sent"), n.log()
    got = hop.received()
    assert got[1] == b"MAIL FROM:<alice@example.test>", got
    assert got[2] == b"RCPT TO:<bob@remote.test> ORCPT=utf-8;b\\x{F6}b\\x{20AC}@remote.test", got
    assert all(b < 0x80 for cmd in got for b in cmd), got


def test_utf8_orcpt_to_a_hop_with_smtputf8(nodes, hops):
    hop = hops(ehlo=[b"PIPELINING", b"8BITMIME", b"DSN", b"SMTPUTF8"])
    n = relay_node(nodes, hop)
    submit(n, "MAIL FROM:<alice@example.test> SMTPUTF8", ["RCPT TO:<bob@remote.test> ORCPT=utf-8;b\u00f6b@remote.test"])
    assert n.wait_log(r"to=<bob@remote\.test>, .*status=sent"), n.log()
    assert hop.received()[2] == "RCPT TO:<bob@remote.test> ORCPT=utf-8;b\u00f6b@remote.test".encode(), hop.received()


def test_hop_that_advertises_smtputf8_then_refuses_it(nodes, hops):
    """The hop's own 5xx to MAIL decides: bounced with its code and text, as Postfix."""
    hop = hops(ehlo=[b"PIPELINING", b"SMTPUTF8", b"8BITMIME", b"DSN"],
               script=lambda c: b"555 5.5.4 Unsupported option: SMTPUTF8\r\n" if c.upper().startswith(b"MAIL") else None)
    n = relay_node(nodes, hop)
    submit(n, "MAIL FROM:<j\u00f6rg@example.test> SMTPUTF8 BODY=8BITMIME RET=HDRS ENVID=a+2Bb",
           ["RCPT TO:<bob@remote.test> NOTIFY=SUCCESS,FAILURE"])
    assert n.wait_log(rf"to=<bob@remote\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{hop.port}, delay=\d+, "
                      rf"dsn=5\.5\.4, status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\]:{hop.port} said: 555 5\.5\.4 "
                      r"Unsupported option: SMTPUTF8 \(in reply to MAIL FROM command\)\)"), n.log()
    got = hop.received()
    assert got[1] == "MAIL FROM:<j\u00f6rg@example.test> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=a+2Bb".encode(), got


def test_mta_sts_cache_fetched_in_the_future_is_ignored(nodes, dns, pki, policy_servers):
    """A cache file whose fetch time lies ahead (tampered with, or a clock set back) would keep its
    policy for as long as it claims (and a huge one overflowed the expiry sum): it is ignored."""
    import os
    import time
    from test_mta_sts import final_node, front_cf, policy_text, records
    final = final_node(nodes, pki, names=("other.example.net",))
    srv = policy_servers(pki, "example.test", policy_text("enforce", ["mx.example.test"]))
    srv.stop()
    d = dns(records(srv, ["other.example.net"], sts_id=None))
    front = nodes(front_cf(d, pki, final.r.port("smtp0"))).start()
    front.stop()
    cache = front.d / "data" / "mta-sts"
    st = os.stat(cache)
    for domain, fetched in (("example.test", int(time.time()) + 10 * 365 * 86400),):
        f = cache / domain
        f.write_text(f"ktrelay-mta-sts 1 20261130a {fetched}\n" + policy_text("enforce", ["mx.example.test"]))
        os.chown(f, st.st_uid, st.st_gid)
    front.start()
    qid = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{qid}: to=<bob@example\.test>, relay=other\.example\.net\[127\.0\.0\.1\]:\d+, .*status=sent"), \
        front.log()
    assert front.wait_log(rf"MTA-STS cache {cache}/example\.test: fetched at \d+, in the future; ignored"), front.log()
    assert "MTA-STS policy of" not in front.log()


@pytest.mark.parametrize("sig", ["TERM", "KILL"])
def test_stop_while_the_hop_holds_the_end_of_data(nodes, hops, sig):
    """ktrelay stops (SIGTERM, or kill -9) while the next hop has the whole message and has not answered
    the final dot: no 250 came, so the message stays queued and goes again after the restart, once."""
    import signal
    held = threading.Event()
    release = threading.Event()
    state = {"n": 0}

    def script(cmd):
        if cmd == b"." and state["n"] == 0:
            state["n"] += 1
            held.set()
            release.wait(30)
            return b"451 4.3.0 too late\r\n"
        return None
    hop = hops(ehlo=[b"8BITMIME"], script=script)
    n = nodes(f"relayhost = [127.0.0.1]:{hop.port}\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert held.wait(20), n.log()
    n.stop(sig=getattr(signal, "SIG" + sig))
    assert [f.name for f in n.queue_files()] == [qid]
    release.set()
    n.start()
    assert n.wait_log(rf"{qid}: to=<bob@remote\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{hop.port}, .*status=sent"), \
        n.log()
    assert wait_for(lambda: n.queue_files() == [], timeout=10)
    # the first transaction had no 250, the second one did
    assert hop.received().count(b"DATA") == 2, hop.received()


def test_rate_delayed_destination_with_a_restart_loses_and_repeats_nothing(nodes, hops):
    """Eight messages to a destination with smtp_destination_rate_delay: one delivery at a time; ktrelay
    stops (SIGTERM) after some went; after the restart every message arrives exactly once (each was
    answered 250 and recorded before the stop, or not sent at all)."""
    import re
    hop = hops(ehlo=[b"PIPELINING"])
    n = nodes(f"relayhost = [127.0.0.1]:{hop.port}\nsmtp_destination_rate_delay = 1s\n").start()
    ids = [n.sendmail([f"u{k}@remote.test"], BODY) for k in range(8)]
    assert n.wait_log(r"to=<u\d@remote\.test>, .*status=sent", count=2, timeout=30), n.log()
    n.stop()
    n.start()
    def rcpts():
        return [c for c in hop.received() if c.startswith(b"RCPT TO:")]
    assert wait_for(lambda: len(rcpts()) >= 8, timeout=60), hop.received()
    assert wait_for(lambda: n.queue_files() == [], timeout=20), n.log()
    got = sorted(rcpts())
    assert got == sorted(f"RCPT TO:<u{k}@remote.test>".encode() for k in range(8)), got
    # one transaction at a time: every MAIL is followed by its end of data before the next MAIL
    seq = [c for c in hop.received() if c.startswith(b"MAIL") or c == b"."]
    assert seq == [b"MAIL FROM:<alice@example.test>", b"."] * 8, seq
    assert len(set(ids)) == 8 and not re.search("status=(deferred|bounced)", n.log())
