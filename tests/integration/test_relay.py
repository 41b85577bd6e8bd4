"""Outbound relay: the queue, the queue manager and the SMTP client against real next hops on
loopback (Postfix's smtp-sink, a second ktrelay), with retries, bounces, TLS policy, restarts
and kill -9."""
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import (BASE_MAIN_CF, BASE_VMAILBOX, BIN, TCP_ESTABLISHED, Relay, free_port, make_cert, tcp_sockets,
                      made_by_test, wait_for, wait_until)

SINK = "/usr/sbin/smtp-sink"

pytestmark = pytest.mark.skipif(not os.path.exists(SINK), reason="smtp-sink (postfix package) not installed")

RELAY_CF = """\
queue_directory = {dir}/queue
minimal_backoff_time = 1s
maximal_backoff_time = 2s
queue_run_delay = 1s
smtp_connect_timeout = 5s
"""


class Sink:
    """smtp-sink on a loopback port; every received transaction is dumped into its own file."""

    def __init__(self, tmp, port=None, args=()):
        self.port = port or free_port()
        # smtp-sink drops privileges: its dump folder must be reachable for "nobody", which the
        # private pytest folders are not
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="ktrelay-sink-"))
        os.chmod(self.dir, 0o777)
        self.args = list(args)
        self.proc = None

    def start(self):
        cmd = [SINK]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += [*self.args, "-d", str(self.dir) + "/%H%M%S.", f"127.0.0.1:{self.port}", "100"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 5
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("smtp-sink did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
        self.proc = None

    def remove(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def messages(self):
        return [p.read_bytes() for p in sorted(self.dir.iterdir())]


@pytest.fixture
def sinks(tmp_path):
    yield from made_by_test(lambda **kw: Sink(tmp_path, **kw), end="remove")


class Node:
    """A ktrelay started and stopped by the test itself (restart, kill -9)."""

    def __init__(self, d, extra, services=None):
        self.d = d
        self.extra = extra
        self.services = services or {"smtp": {}}
        self.r = None
        self.ports = None

    def start(self):
        self.d.mkdir(exist_ok=True)
        (self.d / "vmailbox").write_text(BASE_VMAILBOX)
        main_cf = BASE_MAIN_CF.format(dir=self.d) + self.extra.replace("{dir}", str(self.d))
        if self.r is not None:
            # keep the same listening port across restarts
            self.r.logfile.close()
            os.rename(self.d / "ktrelay.log", self.d / f"ktrelay.log.{time.time_ns()}")
        self.r = Relay(self.d, main_cf, self.services)
        return self

    def stop(self, sig=signal.SIGTERM):
        rc = self.r.stop(sig=sig)
        log = (self.d / "ktrelay.log").read_text(errors="replace")
        if sig == signal.SIGTERM:
            assert rc == 0, log[-3000:]
        assert "AddressSanitizer" not in log and "runtime error" not in log, log[-3000:]
        return log

    def log(self):
        return self.r.log()

    def wait_log(self, pattern, timeout=20, count=1):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(re.findall(pattern, self.log())) >= count:
                return True
            time.sleep(0.1)
        return False

    def sendmail(self, rcpts, body, sender="alice@example.test"):
        p = subprocess.run([BIN, "sendmail", "-v", "-c", str(self.d), "-f", sender, *rcpts], input=body,
                           capture_output=True)
        assert p.returncode == 0, p.stderr
        return re.search(rb"([0-9A-F]+): from=", p.stderr).group(1).decode()

    def queue(self, *args):
        return subprocess.run([BIN, "queue", "-c", str(self.d), *args], capture_output=True, text=True)

    def queue_files(self):
        d = self.d / "queue" / "new"
        return sorted(d.iterdir()) if d.exists() else []


@pytest.fixture
def nodes(tmp_path):
    made = []

    def make(extra, services=None):
        n = Node(tmp_path / f"node{len(made)}", RELAY_CF + extra, services)
        made.append(n)
        return n

    yield make
    for n in made:
        if n.r and n.r.proc.poll() is None:
            n.stop()


BODY = b"Subject: relay test\nMessage-Id: <t1@example.test>\n\nfirst line\n.leading dot\n..two dots\nlast\n"


def test_sendmail_queue_and_cli_without_server(nodes, tmp_path):
    n = nodes("relayhost = [127.0.0.1]:9\n")
    n.d.mkdir()
    (n.d / "vmailbox").write_text(BASE_VMAILBOX)
    (n.d / "main.cf").write_text(BASE_MAIN_CF.format(dir=n.d) + n.extra.replace("{dir}", str(n.d)))
    qid = n.sendmail(["bob@remote.test", "carol@remote.test"], BODY)
    files = n.queue_files()
    assert [f.name for f in files] == [qid]
    text = files[0].read_bytes()
    assert text.startswith(b"KTQUEUE 1\n")
    assert b"sender alice@example.test\n" in text and b"rcpt bob@remote.test\nrcpt carol@remote.test\n" in text
    # stored with CRLF line ends, not dot-stuffed
    assert text.endswith(b"\r\nfirst line\r\n.leading dot\r\n..two dots\r\nlast\r\n")
    out = n.queue("list").stdout
    assert qid in out and "alice@example.test" in out and "bob@remote.test" in out and "1 Request." in out
    assert n.queue("delete", "NOSUCHID").returncode == 66
    p = n.queue("delete", qid)
    assert p.returncode == 0 and f"{qid}: removed" in p.stdout
    assert n.queue_files() == []
    assert "Mail queue is empty" in n.queue("list").stdout
    # sendmail without -i ends the message at a lone dot
    qid = n.sendmail(["bob@remote.test"], b"Subject: x\n\nbefore\n.\nafter\n")
    body = (n.d / "queue" / "new" / qid).read_bytes()
    assert body.endswith(b"\r\nbefore\r\n") and b"after" not in body


def test_relay_to_smtp_sink(nodes, sinks):
    sink = sinks().start()
    n = nodes(f"relayhost = [127.0.0.1]:{sink.port}\n").start()
    qid = n.sendmail(["bob@remote.test", "carol@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: removed"), n.log()
    msgs = sink.messages()
    assert len(msgs) == 1, msgs
    m = msgs[0]
    assert b"X-Mail-Args: <alice@example.test>" in m
    assert b"X-Rcpt-Args: <bob@remote.test>" in m and b"X-Rcpt-Args: <carol@remote.test>" in m
    # dot transparency survived the round trip
    assert b"\r\n.leading dot\r\n..two dots\r\nlast\r\n" in m.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
    log = n.log()
    assert len(re.findall(rf"{qid}: to=<(bob|carol)@remote.test>, relay=127.0.0.1\[127.0.0.1\]:{sink.port}, .*status=sent",
                          log)) == 2
    assert n.queue_files() == []


def test_smtp_bind_address_is_the_source_of_outbound_connections(nodes, sinks):
    """smtp_bind_address: Postfix's smtp(8) connects from that address (what SPF and the next hop's
    access lists see); smtp-sink records the client address of each transaction. An address this host does
    not have fails the connection, and the mail waits: it never leaves from another address."""
    sink = sinks().start()
    n = nodes(f"relayhost = [127.0.0.1]:{sink.port}\nsmtp_bind_address = 127.0.0.7\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: removed"), n.log()
    [m] = sink.messages()
    assert b"X-Client-Addr: 127.0.0.7\n" in m, m[:300]
    n.stop()
    bad = nodes(f"relayhost = [127.0.0.1]:{sink.port}\nsmtp_bind_address = 192.0.2.1\n"
                "smtp_bind_address_enforce = yes\n").start()
    qid = bad.sendmail(["carol@remote.test"], BODY)
    assert bad.wait_log(rf"{qid}: to=<carol@remote.test>, relay=none, .*status=deferred \(bind 192\.0\.2\.1 "
                        rf"\(smtp_bind_address\): Cannot assign requested address\)", timeout=30), bad.log()[-2000:]
    assert len(sink.messages()) == 1
    bad.stop()
    # Postfix's default smtp_bind_address_enforce = no: said, and sent from the kernel's choice
    soft = nodes(f"relayhost = [127.0.0.1]:{sink.port}\nsmtp_bind_address = [192.0.2.1]\n").start()
    qid = soft.sendmail(["erin@remote.test"], BODY)
    assert soft.wait_log(rf"{qid}: removed"), soft.log()
    assert (f"warning: 127.0.0.1[127.0.0.1]:{sink.port}: bind 192.0.2.1 (smtp_bind_address): Cannot assign "
            f"requested address; connecting from the kernel's choice of address (set smtp_bind_address_enforce "
            f"= yes to defer instead)") in soft.log()
    soft.stop()
    # without smtp_bind_address, inet_interfaces' one address is used only when it is not a loopback address
    lo = nodes(f"relayhost = [127.0.0.1]:{sink.port}\ninet_interfaces = 127.0.0.5\n").start()
    qid = lo.sendmail(["dave@remote.test"], BODY)
    assert lo.wait_log(rf"{qid}: removed"), lo.log()
    sources = sorted(re.search(rb"X-Client-Addr: (\S+)\n", m).group(1) for m in sink.messages())
    assert sources == [b"127.0.0.1", b"127.0.0.1", b"127.0.0.7"], sources


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and ip(8) for a network namespace")
def test_inet_interfaces_one_address_is_the_smtp_bind_address(tmp_path):
    """Postfix: with smtp_bind_address empty, inet_interfaces' only IPv4 address, when it is not a loopback
    address, is the source of outbound connections. Run in a private network namespace whose lo also holds
    192.0.2.77 (a forked child of this test: nothing of the host's network changes)."""
    import ctypes
    pid = os.fork()
    if pid == 0:
        ok = 1
        try:
            if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:     # CLONE_NEWNET
                os._exit(2)
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            subprocess.run(["ip", "addr", "add", "192.0.2.77/32", "dev", "lo"], check=True)
            sink = Sink(tmp_path).start()
            n = Node(tmp_path / "ns", RELAY_CF + f"relayhost = [127.0.0.1]:{sink.port}\n"
                     "inet_interfaces = 192.0.2.77\n")   # its listener keeps 127.0.0.1 (master.cf host)
            n.start()
            qid = n.sendmail(["bob@remote.test"], BODY)
            if n.wait_log(rf"{qid}: removed", timeout=30):
                [m] = sink.messages()
                ok = 0 if b"X-Client-Addr: 192.0.2.77\n" in m else 3
            n.stop()
            sink.remove()
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(ok)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


@pytest.mark.parametrize("value,message", [
    ("smtp_bind_address = 127.0.0.300", 'bad value "127.0.0.300" for smtp_bind_address: expected a numerical '
                                        'IPv4 address'),
    ("smtp_bind_address = ::1", 'bad value "::1" for smtp_bind_address: expected a numerical IPv4 address'),
    ("smtp_bind_address6 = 127.0.0.1", 'bad value "127.0.0.1" for smtp_bind_address6: expected a numerical '
                                       'IPv6 address'),
    ("smtp_bind_address = 127.0.0.2 127.0.0.3", 'bad value "127.0.0.2 127.0.0.3" for smtp_bind_address: '
                                                'expected one numerical address'),
])
def test_smtp_bind_address_that_is_not_an_address_is_refused(tmp_path, value, message):
    d = tmp_path / "cf"
    d.mkdir()
    (d / "main.cf").write_text(f"queue_directory = {d}/queue\ndata_directory = {d}/data\n{value}\n")
    p = subprocess.run([BIN, "check-config", "-c", str(d)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 78 and message in p.stderr, p.stderr


def test_deferred_while_down_then_delivered(nodes, sinks):
    sink = sinks()
    n = nodes(f"relayhost = [127.0.0.1]:{sink.port}\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: to=<bob@remote.test>, relay=none, .*status=deferred \(connect to .*Connection refused"), n.log()
    assert [f.name for f in n.queue_files()] == [qid]
    assert "bob@remote.test" in n.queue("list").stdout
    sink.start()
    assert n.wait_log(rf"{qid}: to=<bob@remote.test>, relay=127.0.0.1.*status=sent"), n.log()
    assert n.wait_log(rf"{qid}: removed")
    assert len(sink.messages()) == 1


def test_soft_error_then_success(nodes, sinks):
    sink = sinks(args=["-r", "RCPT"]).start()
    n = nodes(f"relayhost = [127.0.0.1]:{sink.port}\nminimal_backoff_time = 3s\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: to=<bob@remote.test>, relay=127.0.0.1.*dsn=4\.\d\.\d, status=deferred \(host .* said: 4"), n.log()
    assert sink.messages() == []
    sink.stop()
    sink.args = []
    sink.start()
    assert n.wait_log(rf"{qid}: to=<bob@remote.test>, .*status=sent"), n.log()
    assert len(sink.messages()) == 1
    assert n.queue_files() == []


def test_hard_error_bounces_to_local_sender(nodes, sinks):
    sink = sinks(args=["-f", "RCPT"]).start()
    n = nodes(f"relayhost = [127.0.0.1]:{sink.port}\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY, sender="alice@example.test")
    assert n.wait_log(rf"{qid}: to=<bob@remote.test>, .*dsn=5\.\d\.\d, status=bounced \(host .* said: 5"), n.log()
    assert n.wait_log(rf"{qid}: sender non-delivery notification: ([0-9A-F]+)")
    bid = re.search(rf"{qid}: sender non-delivery notification: ([0-9A-F]+)", n.log()).group(1)
    assert n.wait_log(rf"{bid}: to=<alice@example.test>, relay=virtual, .*status=sent")
    assert n.wait_log(rf"{bid}: removed") and n.wait_log(rf"{qid}: removed")
    box = n.d / "mail" / "example.test" / "alice" / "new"
    files = wait_for(lambda: list(box.iterdir()) if box.exists() else [])
    assert len(files) == 1
    dsn = files[0].read_bytes().decode()
    assert dsn.startswith("Return-Path: <>\r\n")          # null sender: no bounce loop
    assert "Content-Type: multipart/report; report-type=delivery-status;" in dsn
    assert "Subject: Undelivered Mail Returned to Sender" in dsn
    assert "Content-Type: message/delivery-status" in dsn
    assert "Final-Recipient: rfc822; bob@remote.test" in dsn
    assert "Action: failed" in dsn
    assert re.search(r"Status: 5\.\d\.\d", dsn)
    assert "Remote-MTA: dns; 127.0.0.1" in dsn
    assert "Diagnostic-Code: smtp; 5" in dsn
    # without RET=HDRS the whole message comes back, as from Postfix (test_envelope_props.py: RET=HDRS)
    assert "Content-Description: Undelivered Message\r\nContent-Type: message/rfc822\r\n" in dsn
    assert "Subject: relay test" in dsn and "Message-Id: <t1@example.test>" in dsn
    assert "\r\nfirst line\r\n" in dsn
    assert n.queue_files() == []
    assert sink.messages() == []


def test_no_bounce_for_a_bounce(nodes, sinks):
    sink = sinks(args=["-f", "RCPT"]).start()
    n = nodes(f"relayhost = [127.0.0.1]:{sink.port}\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY, sender="<>")
    assert n.wait_log(rf"{qid}: to=<bob@remote.test>, .*status=bounced"), n.log()
    assert n.wait_log(rf"{qid}: removed")
    assert "notification" not in n.log()
    assert n.queue_files() == []


def test_unknown_local_recipient_bounces(nodes):
    n = nodes("").start()
    qid = n.sendmail(["nobody@example.test", "bob@example.test"], BODY, sender="alice@example.test")
    assert n.wait_log(rf"{qid}: to=<bob@example.test>, relay=virtual, .*status=sent"), n.log()
    assert n.wait_log(rf"{qid}: to=<nobody@example.test>, relay=virtual, .*status=bounced")
    assert n.wait_log(rf"{qid}: removed")
    box = n.d / "mail" / "example.test" / "alice" / "new"
    files = wait_for(lambda: list(box.iterdir()) if box.exists() else [])
    assert len(files) == 1 and "Final-Recipient: rfc822; nobody@example.test" in files[0].read_text()
    bob = list((n.d / "mail" / "example.test" / "bob" / "new").iterdir())
    assert len(bob) == 1 and bob[0].read_bytes().endswith(b"\r\n.leading dot\r\n..two dots\r\nlast\r\n")


def test_unknown_local_recipient_bounces_whatever_the_reject_code(nodes):
    """unknown_local_recipient_reject_code = 450 makes smtpd refuse for now; mail already accepted (here
    from sendmail) for an unknown local user still bounces at once, as Postfix's local(8) bounces it."""
    n = nodes("mydestination = localhost\nunknown_local_recipient_reject_code = 450\n").start()
    qid = n.sendmail(["no-such-user-kt@localhost"], BODY, sender="alice@example.test")
    assert n.wait_log(rf"{qid}: to=<no-such-user-kt@localhost>, relay=local, .*dsn=5\.1\.1, status=bounced "
                      rf"\(550 5\.1\.1 <no-such-user-kt@localhost>: Recipient address rejected: User unknown in "
                      rf"local recipient table\)", timeout=30), n.log()[-2000:]


def test_tls_required_but_not_offered_is_deferred(nodes, sinks):
    sink = sinks().start()
    n = nodes(f"relayhost = [127.0.0.1]:{sink.port}\nsmtp_tls_security_level = encrypt\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY)
    deferred = rf"{qid}: to=<bob@remote.test>, .*status=deferred \(TLS is required, but was not offered"
    assert n.wait_log(deferred), n.log()
    assert n.wait_log(deferred, count=2), n.log()           # the retry a second later too
    assert sink.messages() == []                            # never sent in plaintext
    assert [f.name for f in n.queue_files()] == [qid]


def test_relay_to_second_ktrelay_with_transport_maps(nodes):
    final = nodes("").start()
    port = final.r.port()
    # example.test is not local on the front node: transport_maps sends it (and example.org) to the final node
    front = nodes("virtual_mailbox_domains = localhost\n"
                  f"transport_maps = inline:{{ example.test=smtp:[127.0.0.1]:{port}, example.org=smtp:[127.0.0.1]:{port} }}\n"
                  "relayhost = [127.0.0.1]:9\n").start()
    big = BODY + b"y" * 300000 + b"\n"
    qid = front.sendmail(["bob@example.test"], big)
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=127.0.0.1\[127.0.0.1\]:{port}, .*status=sent"), front.log()
    files = wait_for(lambda: final.r.maildir_files("example.test/bob/"))
    assert len(files) == 1
    got = files[0].read_bytes()
    # what the front node queued arrives byte for byte after the final node's own Received: header
    assert got.endswith(b"\r\nfirst line\r\n.leading dot\r\n..two dots\r\nlast\r\n" + b"y" * 300000 + b"\r\n")
    assert b"Received: by mx.example.test (ktrelay" in got
    # ktrelay offers CHUNKING: the body went out with BDAT
    assert final.wait_log(r"disconnect from .* bdat=1"), final.log()[-2000:]
    # the final node does not relay example.org: the front bounces to alice, whose mailbox is on the final node
    qid2 = front.sendmail(["carol@example.org"], BODY, sender="alice@example.test")
    assert front.wait_log(rf"{qid2}: to=<carol@example.org>, .*status=bounced \(host 127.0.0.1\[127.0.0.1\]:{port} said: 5"), front.log()
    alice = wait_for(lambda: final.r.maildir_files("example.test/alice/"))
    assert len(alice) == 1 and "Final-Recipient: rfc822; carol@example.org" in alice[0].read_text()


def test_starttls_to_second_ktrelay(nodes, tmp_path):
    cert, key = make_cert(tmp_path, cn="localhost")
    final = nodes("", services={"smtp": {"smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(cert),
                                         "smtpd_tls_key_file": str(key)}}).start()
    port = final.r.port()
    # verify matches smtp_tls_verify_cert_match (Postfix: "hostname", here the literal 127.0.0.1); the
    # certificate is for localhost, so that name is asked for
    front = nodes(f"virtual_mailbox_domains = localhost\nrelayhost = [127.0.0.1]:{port}\nsmtp_tls_security_level = verify\nsmtp_tls_CAfile = {cert}\n"
                  "smtp_tls_servername = localhost\nsmtp_tls_verify_cert_match = localhost\nsmtp_tls_loglevel = 1\n").start()
    qid = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, .*status=sent"), front.log()
    assert re.search(r"Verified TLS connection established to 127.0.0.1\[127.0.0.1\]:\d+: TLSv1\.[23] with cipher",
                     front.log())
    assert final.wait_log(r"TLS connection established from")
    files = wait_for(lambda: final.r.maildir_files("example.test/bob/"))
    assert len(files) == 1 and files[0].read_bytes().endswith(b"\r\n.leading dot\r\n..two dots\r\nlast\r\n")


def test_verify_fails_for_wrong_name(nodes, tmp_path):
    cert, key = make_cert(tmp_path, cn="localhost")
    final = nodes("", services={"smtp": {"smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(cert),
                                         "smtpd_tls_key_file": str(key)}}).start()
    front = nodes(f"virtual_mailbox_domains = localhost\nrelayhost = [127.0.0.1]:{final.r.port()}\n"
                  "smtp_tls_security_level = verify\n"
                  f"smtp_tls_CAfile = {cert}\nsmtp_tls_verify_cert_match = wrong.example\n").start()
    qid = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, .*status=deferred \(Server certificate not verified"), front.log()
    assert final.r.maildir_files("example.test/bob/") == []


def test_restart_with_a_full_queue(nodes, sinks):
    sink = sinks()
    n = nodes(f"relayhost = [127.0.0.1]:{sink.port}\ndefault_destination_concurrency_limit = 3\n").start()
    ids = [n.sendmail([f"u{i}@remote.test"], BODY) for i in range(20)]
    assert n.wait_log(r"status=deferred", count=20), n.log()
    n.stop()
    assert len(n.queue_files()) == 20
    sink.start()
    n.start()
    assert n.wait_log(r"status=sent", count=20, timeout=30), n.log()
    for qid in ids:
        assert n.wait_log(rf"{qid}: removed")
    assert len(sink.messages()) == 20
    assert n.queue_files() == []
    # connection reuse: fewer SMTP connections than messages
    assert len(set(re.findall(r"relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+", n.log()))) == 1


def test_kill_9_during_delivery(nodes, sinks):
    # the sink waits 4 s before answering DATA: ktrelay is killed mid-transaction
    sink = sinks(args=["-w", "4"]).start()
    n = nodes(f"relayhost = [127.0.0.1]:{sink.port}\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY)
    # ktrelay is connected to the sink, which holds back its answer to DATA
    wait_until(lambda: any(s["remote_port"] == sink.port and s["state"] == TCP_ESTABLISHED for s in tcp_sockets()),
               20, "the delivery to the sink")
    n.stop(sig=signal.SIGKILL)
    assert [f.name for f in n.queue_files()] == [qid]        # nothing acknowledged is lost
    sink.stop()
    sink.args = []
    sink.start()
    n.start()
    assert n.wait_log(rf"{qid}: to=<bob@remote.test>, .*status=sent"), n.log()
    assert n.wait_log(rf"{qid}: removed")
    # delivered; a second copy only if the kill fell after the sink's 250 (it did not answer yet)
    assert 1 <= len(sink.messages()) <= 2
    assert n.queue_files() == []


def test_flush_retries_at_once(nodes, sinks):
    sink = sinks()
    n = nodes(f"relayhost = [127.0.0.1]:{sink.port}\nminimal_backoff_time = 1h\nmaximal_backoff_time = 2h\n"
              "queue_run_delay = 1h\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: .*status=deferred"), n.log()
    sink.start()
    # the queue manager has had its turn since the sink came up: it delivered a new local message
    local = n.sendmail(["bob@example.test"], BODY)
    assert n.wait_log(rf"{local}: to=<bob@example.test>, relay=virtual, .*status=sent"), n.log()
    assert sink.messages() == []                            # the next retry is an hour away
    assert n.queue("flush").returncode == 0
    assert n.wait_log(rf"{qid}: .*status=sent"), n.log()
    assert len(sink.messages()) == 1


def test_smtp_client_relays_through_the_queue(nodes, sinks):
    """A permitted client (mynetworks) sends to a remote and a local recipient in one transaction: the
    250 comes after the queue file is durable; the remote copy goes to the next hop, the local one to
    its Maildir."""
    import smtplib
    sink = sinks().start()
    n = nodes(f"mynetworks = 127.0.0.0/8\nrelayhost = [127.0.0.1]:{sink.port}\n").start()
    body = b"Subject: via smtp\r\n\r\nhello\r\n..stuffed\r\n"
    with smtplib.SMTP("127.0.0.1", n.r.port(), timeout=10) as c:
        c.ehlo("client.test")
        refused = c.sendmail("alice@example.test", ["bob@remote.test", "bob@example.test"], body)
        assert refused == {}
        # BDAT too, with ktrelay's own CHUNKING
        c.docmd("MAIL FROM:<alice@example.test>")
        assert c.docmd("RCPT TO:<carol@remote.test>")[0] == 250
        chunk = b"Subject: bdat\r\n\r\nok\r\n"
        c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        code, msg = c.getreply()
        assert code == 250, msg
    assert n.wait_log(r"to=<bob@remote.test>, relay=127.0.0.1.*status=sent"), n.log()
    assert n.wait_log(r"to=<carol@remote.test>, relay=127.0.0.1.*status=sent"), n.log()
    assert n.wait_log(r"to=<bob@example.test>, relay=virtual, .*status=sent"), n.log()
    msgs = wait_for(lambda: len(sink.messages()) == 2 and sink.messages())
    assert any(b"\n..stuffed" in m and b"X-Rcpt-Args: <bob@remote.test>" in m for m in msgs)
    assert any(b"Subject: bdat" in m for m in msgs)
    local = wait_for(lambda: n.r.maildir_files("example.test/bob/"))
    got = local[0].read_bytes()
    assert got.endswith(b"Subject: via smtp\r\n\r\nhello\r\n..stuffed\r\n")   # smtplib stuffed it once more
    assert b"Received: from client.test" in got
    assert wait_for(lambda: n.queue_files() == [])


def test_unpermitted_client_cannot_relay(nodes, sinks):
    import smtplib
    sink = sinks().start()
    n = nodes(f"mynetworks = 192.0.2.0/24\nrelayhost = [127.0.0.1]:{sink.port}\n").start()
    with smtplib.SMTP("127.0.0.1", n.r.port(), timeout=10) as c:
        c.ehlo("client.test")
        c.docmd("MAIL FROM:<x@client.test>")
        code, _ = c.docmd("RCPT TO:<bob@remote.test>")
        assert code in (450, 454, 554)
    assert n.wait_log(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=1 mail=1 rcpt=0/1 quit=1"), n.log()
    assert sink.messages() == [] and n.queue_files() == []


def test_reload_reaches_queue_manager(nodes, sinks, tmp_path):
    """SIGHUP hands the queue manager the new generation: a changed relayhost, transport_maps and
    smtp_tls_security_level apply to the next delivery, without a restart."""
    a = sinks().start()
    b = sinks().start()
    c = sinks().start()
    n = nodes(f"relayhost = [127.0.0.1]:{a.port}\n").start()
    main_cf = n.d / "main.cf"
    q1 = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{q1}: to=<bob@remote.test>, relay=127.0.0.1\[127.0.0.1\]:{a.port}, .*status=sent"), n.log()

    # relayhost moves to b; a second domain is routed by transport_maps to c
    (n.d / "transport").write_text(f"other.test smtp:[127.0.0.1]:{c.port}\n")
    main_cf.write_text(main_cf.read_text().replace(f"relayhost = [127.0.0.1]:{a.port}",
                                                   f"relayhost = [127.0.0.1]:{b.port}\n"
                                                   f"transport_maps = texthash:{n.d}/transport"))
    n.r.proc.send_signal(signal.SIGHUP)
    assert n.wait_log(r"queue manager: configuration reloaded"), n.log()
    q2 = n.sendmail(["bob@remote.test"], BODY)
    q3 = n.sendmail(["carol@other.test"], BODY)
    assert n.wait_log(rf"{q2}: to=<bob@remote.test>, relay=127.0.0.1\[127.0.0.1\]:{b.port}, .*status=sent"), n.log()
    assert n.wait_log(rf"{q3}: to=<carol@other.test>, relay=127.0.0.1\[127.0.0.1\]:{c.port}, .*status=sent"), n.log()
    assert len(a.messages()) == 1 and len(b.messages()) == 1 and len(c.messages()) == 1

    # TLS becomes mandatory: smtp-sink offers no STARTTLS, so the next message waits in the queue
    main_cf.write_text(main_cf.read_text() + "smtp_tls_security_level = encrypt\n")
    n.r.proc.send_signal(signal.SIGHUP)
    assert n.wait_log(r"queue manager: configuration reloaded", count=2), n.log()
    q4 = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{q4}: to=<bob@remote.test>, .*status=deferred \(TLS is required, but was not offered"), n.log()
    assert len(b.messages()) == 1
    assert [f.name for f in n.queue_files()] == [q4]

    # a reload with an error in a queue manager parameter is refused as a whole
    main_cf.write_text(main_cf.read_text() + "smtp_tls_security_level = dnssec\n")
    n.r.proc.send_signal(signal.SIGHUP)
    assert n.wait_log(r"reload: configuration has errors; keeping the running one"), n.log()
    assert len(re.findall(r"queue manager: configuration reloaded", n.log())) == 2
