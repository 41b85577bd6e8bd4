"""Logs an operator's tools read: a traffic mix with known counts (local, relayed, deferred, bounced,
rejected) through a real ktrelay with maillog_file, relaying to Postfix's smtp-sink, then Debian's
pflogsumm (--syslog-name=ktrelay) on that file must count every class exactly; one short queue id
ties each message's lines, its Maildir file name and its queue file together; syslog gets the same
lines through /dev/log."""
import os
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from conftest import BIN, BASE_MAIN_CF, BASE_VMAILBOX, Relay, free_port, make_searchable, wait_until

PFLOGSUMM = shutil.which("pflogsumm") or "/usr/sbin/pflogsumm"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"

pytestmark = pytest.mark.skipif(not (os.path.exists(PFLOGSUMM) and os.path.exists(SMTP_SINK)),
                                reason="needs pflogsumm and Postfix's smtp-sink")

LINE = re.compile(r"^(\w{3}) (\d{2}) (\d{2}):(\d{2}):(\d{2}) (\S+) ktrelay/(\w+)\[(\d+)\]: (.*)$")


def refusing_port():
    """(socket, port): a port bound but not listening, held for the test, so connections to it are refused
    and no other test's server can take it meanwhile (a merely free port could be)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


class Sink:
    """Postfix's smtp-sink on a free loopback port; `args` make it refuse commands (-f RCPT)."""

    def __init__(self, *args, port=None):
        self.port = port or free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen([SMTP_SINK, *user, *args, f"127.0.0.1:{self.port}", "10"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False
        wait_until(up, 10, "smtp-sink")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def send(port, sender, rcpt, msgid):
    body = f"From: <{sender or 'x@example.test'}>\r\nSubject: mix\r\nMessage-ID: {msgid}\r\n\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.sendmail(sender, [rcpt], body)


def pflogsumm_totals(maillog):
    out = subprocess.run(["perl", PFLOGSUMM, "--syslog-name=ktrelay", str(maillog)], capture_output=True,
                         text=True, check=True).stdout
    totals = {}
    for key in ("received", "delivered", "deferred", "bounced", "rejected"):
        m = re.search(rf"^\s+(\d+)\s+{key}\b", out, re.M)
        assert m, out
        totals[key] = int(m.group(1))
    return totals, out


def test_traffic_mix_counts_with_pflogsumm(tmp_path):
    ok, refuse = Sink(), Sink("-f", "RCPT")
    holder, closed = refusing_port()
    d = tmp_path / "relay"
    d.mkdir()
    (d / "vmailbox").write_text(BASE_VMAILBOX)
    (d / "transport").write_text(f"relay.test smtp:[127.0.0.1]:{ok.port}\n"
                                 f"bounce.test smtp:[127.0.0.1]:{refuse.port}\n"
                                 f"defer.test smtp:[127.0.0.1]:{closed}\n")
    main_cf = BASE_MAIN_CF.format(dir=d) + (
        f"queue_directory = {d}/queue\n"
        f"maillog_file_prefixes = /var, {d}\n"
        f"maillog_file = {d}/maillog\n"
        "mynetworks = 127.0.0.0/8\n"
        f"transport_maps = texthash:{d}/transport\n")
    r = Relay(d, main_cf, {"smtp": {}})
    try:
        port = r.port()
        sent = []      # (kind, message-id)
        for i in range(3):
            send(port, "alice@example.test", "bob@example.test", f"<local{i}@mix>")
            sent.append(("local", f"<local{i}@mix>"))
        for i in range(2):
            send(port, "alice@example.test", f"r{i}@relay.test", f"<relay{i}@mix>")
            sent.append(("relayed", f"<relay{i}@mix>"))
        for i in range(2):
            send(port, "alice@example.test", f"d{i}@defer.test", f"<defer{i}@mix>")
            sent.append(("deferred", f"<defer{i}@mix>"))
        for i in range(2):    # null sender: no bounce message of its own
            send(port, "", f"b{i}@bounce.test", f"<bounce{i}@mix>")
            sent.append(("bounced", f"<bounce{i}@mix>"))
        for i in range(3):
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                send(port, "alice@example.test", f"nobody{i}@example.test", f"<reject{i}@mix>")
        maillog = d / "maillog"

        def settled():
            text = maillog.read_text()
            return (text.count("status=sent") == 5 and text.count("status=deferred") == 2
                    and text.count("status=bounced") == 2)
        wait_until(settled, 30, "deliveries, deferrals and bounces in maillog_file")
    finally:
        assert r.stop() == 0, r.log()[-3000:]
        ok.stop()
        refuse.stop()
        holder.close()

    text = maillog.read_text()
    lines = text.splitlines()
    host = "mx"   # myhostname mx.example.test: the first label, as Postfix writes it
    for ln in lines:
        m = LINE.match(ln)
        assert m, f"not a maillog line: {ln!r}"
        assert m.group(6) == host
    totals, report = pflogsumm_totals(maillog)
    assert totals == {"received": 9, "delivered": 5, "deferred": 2, "bounced": 2, "rejected": 3}, report

    # one queue id per message: one client=, one message-id=, one from=, its to= lines, by service
    by_id = defaultdict(list)
    for ln in lines:
        m = LINE.match(ln)
        mm = re.match(r"([0-9A-F]{10,}): (.*)$", m.group(9))
        if mm:
            by_id[mm.group(1)].append((m.group(7), mm.group(2)))
    ids = [i for i, ev in by_id.items() if any(t.startswith("client=") for _, t in ev)]
    assert len(ids) == 9
    kinds = Counter()
    for qid in ids:
        ev = by_id[qid]
        assert len(qid) <= 16
        assert [s for s, t in ev if t.startswith("client=")] == ["smtpd"]
        mid = [t for s, t in ev if s == "cleanup" and t.startswith("message-id=")]
        assert len(mid) == 1
        assert [s for s, t in ev if t.startswith("from=")] == ["qmgr"]
        to = [(s, t) for s, t in ev if t.startswith("to=")]
        assert len(to) == 1, ev
        kind = dict((m_id, k) for k, m_id in sent)[mid[0][len("message-id="):]]
        kinds[kind] += 1
        service, t = to[0]
        status = re.search(r"status=(\w+)", t).group(1)
        assert (kind, service, status) in {("local", "virtual", "sent"), ("relayed", "smtp", "sent"),
                                           ("deferred", "smtp", "deferred"), ("bounced", "smtp", "bounced")}
        if kind == "local":
            names = [p.name for p in (d / "mail" / "example.test" / "bob" / "new").iterdir()]
            assert sum(qid in n for n in names) == 1, (qid, names)
        if kind == "deferred":
            assert (d / "queue" / "new" / qid).exists()
    assert kinds == {"local": 3, "relayed": 2, "deferred": 2, "bounced": 2}
    assert len([ln for ln in lines if "NOQUEUE: reject: RCPT from" in ln]) == 3


def test_maillog_file_prefixes_are_checked(tmp_path):
    d = tmp_path
    (d / "main.cf").write_text(f"maillog_file = {d}/maillog\nalias_maps =\n")
    r = subprocess.run([BIN, "check-config", "-c", str(d)], capture_output=True, text=True)
    assert r.returncode == 78
    assert f'maillog_file value "{d}/maillog" does not match any prefix in maillog_file_prefixes' in r.stderr
    (d / "main.cf").write_text("syslog_facility = mial\nalias_maps =\n")
    r = subprocess.run([BIN, "check-config", "-c", str(d)], capture_output=True, text=True)
    assert r.returncode == 78 and 'syslog_facility: unknown facility "mial"' in r.stderr


def test_syslog_by_default(tmp_path):
    """Without maillog_file every line goes to /dev/log with the mail facility, as Postfix's do. The
    test gives ktrelay a /dev of its own (a private mount namespace) whose log socket it reads."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private /dev")
    dev = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(dev / "log"))
        sock.settimeout(10)
        for name in ("null", "zero", "random", "urandom"):
            (dev / name).touch()
        d = tmp_path / "relay"
        d.mkdir()
        make_searchable(d)
        (d / "vmailbox").write_text(BASE_VMAILBOX)
        port = free_port()
        (d / "main.cf").write_text(BASE_MAIN_CF.format(dir=d) + f"queue_directory = {d}/queue\n"
                                   "syslog_name = ktrelay\n")
        (d / "master.cf").write_text(f"127.0.0.1:{port} inet n - n - - smtpd\n")
        script = ("set -e; for f in null zero random urandom; do mount --bind /dev/$f \"$1/$f\"; done; "
                  "mount --bind \"$1\" /dev; shift; exec \"$@\"")
        logf = open(d / "stderr.log", "w+b")
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(dev),
                                 BIN, "run", "-c", str(d)], stdout=logf, stderr=subprocess.STDOUT)
        try:
            got = []
            deadline = time.time() + 15
            while time.time() < deadline and not any("daemon started" in g for g in got):
                got.append(sock.recv(4096).decode())
            send(port, "alice@example.test", "bob@example.test", "<sys@mix>")
            while time.time() < deadline and not any("status=sent" in g for g in got):
                got.append(sock.recv(4096).decode())
        finally:
            proc.terminate()
            assert proc.wait(timeout=15) == 0
            logf.close()
        started = [g for g in got if "daemon started" in g]
        assert started, got
        # <22> = mail.info; RFC 3164 time stamp, then the Postfix-style tag
        assert re.match(r"^<22>\w{3} [ \d]\d \d\d:\d\d:\d\d ktrelay/master\[\d+\]: daemon started", started[0])
        sent = [g for g in got if "status=sent" in g]
        assert re.match(r"^<22>.* ktrelay/virtual\[\d+\]: [0-9A-F]+: to=<bob@example.test>, relay=virtual", sent[0])
        # the foreground keeps its stderr copy
        assert "status=sent" in (d / "stderr.log").read_text()
    finally:
        shutil.rmtree(dev, ignore_errors=True)


def test_bounce_notification_has_its_own_id_lines(tmp_path):
    refuse = Sink("-f", "RCPT")
    d = tmp_path / "relay"
    d.mkdir()
    (d / "vmailbox").write_text(BASE_VMAILBOX)
    (d / "transport").write_text(f"bounce.test smtp:[127.0.0.1]:{refuse.port}\n")
    main_cf = BASE_MAIN_CF.format(dir=d) + (
        f"queue_directory = {d}/queue\nmaillog_file_prefixes = {d}\nmaillog_file = {d}/maillog\n"
        f"mynetworks = 127.0.0.0/8\ntransport_maps = texthash:{d}/transport\n")
    r = Relay(d, main_cf, {"smtp": {}})
    try:
        send(r.port(), "alice@example.test", "b@bounce.test", "<ndr@mix>")
        log = d / "maillog"
        m = wait_until(lambda: re.search(r"ktrelay/bounce\[\d+\]: ([0-9A-F]+): sender non-delivery notification: "
                                         r"([0-9A-F]+)", log.read_text()), 30, "the notification")
        orig, ndr = m.group(1), m.group(2)
        wait_until(lambda: f"{ndr}: to=<alice@example.test>, relay=virtual" in log.read_text(), 30, "its delivery")
    finally:
        assert r.stop() == 0
        refuse.stop()
    text = log.read_text()
    assert re.search(rf"ktrelay/smtp\[\d+\]: {orig}: to=<b@bounce.test>, .*status=bounced", text)
    assert re.search(rf"ktrelay/cleanup\[\d+\]: {ndr}: message-id=<[^>]+>", text), text
    assert re.search(rf"ktrelay/qmgr\[\d+\]: {ndr}: from=<>, size=\d+, nrcpt=1 \(queue active\)", text), text
    assert re.search(rf"ktrelay/virtual\[\d+\]: {ndr}: to=<alice@example.test>, relay=virtual, .*status=sent", text)
