"""Process model, started as root: the processes that hold the SMTP listening sockets (and run the
queue manager) have euid != 0, CapEff 0 and NoNewPrivs on every thread; the master that started them
holds none of the sockets. A missing mail_owner or a virtual_mailbox_base that mail_owner cannot
write stops the start with a message that says what to run. Reload (SIGHUP) starts a new generation:
swapped, added and removed master.cf services each speak what their line says, new handshakes get the
new certificate, a session in flight on the old generation finishes; a configuration with errors is
refused and the running one kept."""
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import time

import pytest

from conftest import BIN, MAIL_OWNER, free_port, make_cert, make_searchable
from conftest import SmtpConn as Smtp
from test_smtp import queued, send_data_only, start_data

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the process model only changes when started as root")


def proc_status(path):
    fields = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.partition(":")
            fields[k] = v.strip()
    return fields


def listening_inodes(port):
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":
                    inodes.add(cols[9])
    return inodes


def socket_holders(inodes):
    want = {f"socket:[{i}]" for i in inodes}
    pids = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in want:
                    pids.add(int(pid))
        except OSError:
            continue
    return pids


def threads(pid):
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        st = proc_status(f"/proc/{pid}/task/{tid}/status")
        out.append(st)
    return out


def children(ppid):
    kids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
                kids.append(int(pid))
    return kids


def test_smtp_ports_are_served_without_privileges(relay_factory, tmp_path):
    cert, key = make_cert(tmp_path)
    r = relay_factory(f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n"
                      f"queue_directory = {tmp_path}/queue\n",
                      services={"smtp": {"smtpd_tls_security_level": "may"},
                                "smtps": {"smtpd_tls_wrappermode": "yes"}})
    owner_uid = int(subprocess.run(["id", "-u", MAIL_OWNER], capture_output=True, check=True).stdout)
    serving = set()
    for label in ("smtp", "smtps"):
        pids = socket_holders(listening_inodes(r.port(label)))
        assert pids, label
        assert r.proc.pid not in pids           # the master keeps no listening socket
        serving |= pids
    names = set()
    for pid in serving:
        assert pid in children(r.proc.pid)
        for st in threads(pid):
            names.add(st["Name"])
            uids = st["Uid"].split()
            assert uids[1] != "0" and int(uids[1]) == owner_uid, st
            assert set(uids) == {str(owner_uid)}, st
            assert int(st["CapEff"], 16) == 0, st
            assert int(st["CapPrm"], 16) == 0, st
            assert int(st["CapBnd"], 16) == 0, st
            assert st["NoNewPrivs"] == "1", st
    # the queue manager and the event loops are threads of those processes
    assert {"ktrelay-qmgr", "ktrelay-w0", "ktrelay-w1"} <= names, names
    # with jemalloc (release builds), its purging threads run in the worker too (a forked child gets none, and
    # the memory a burst of handshakes freed stayed), unprivileged like the rest (checked above)
    if b"libjemalloc" in subprocess.run(["ldd", BIN], capture_output=True, check=True).stdout:
        assert "jemalloc_bg_thd" in names, names
    # and the service works: a session and a delivery
    c = Smtp(r.port("smtp"))
    start_data(c)
    queued(send_data_only(c, b"Subject: unprivileged\r\n\r\nhi\r\n"))
    files = r.maildir_files()
    assert len(files) == 1
    assert os.stat(files[0]).st_uid == owner_uid


def run_expect_failure(d, main_cf, code, master_cf="127.0.0.1:%d inet n - n - - smtpd\n"):
    (d / "main.cf").write_text(main_cf)
    (d / "master.cf").write_text(master_cf % free_port())
    p = subprocess.run([BIN, "run", "-c", str(d)], capture_output=True, text=True, timeout=30)
    assert p.returncode == code, p.stderr
    return p.stderr


def test_missing_mail_owner_says_how_to_create_it(tmp_path):
    d = tmp_path / "cfg"
    d.mkdir()
    err = run_expect_failure(d, f"mail_owner = ktnosuch\nqueue_directory = {d}/queue\ndata_directory = {d}\n"
                                "inet_protocols = ipv4\nmydestination =\nalias_maps =\n", 78)     # EX_CONFIG
    assert ("fatal: mail_owner ktnosuch: no such user; create it with: useradd --system --home-dir /var/lib/ktrelay "
            "--shell /usr/sbin/nologin ktnosuch") in err


def test_unwritable_virtual_mailbox_base_names_the_chown(tmp_path):
    d = tmp_path / "cfg"
    d.mkdir()
    make_searchable(d)
    base = d / "mail"
    base.mkdir(mode=0o755)          # root's
    (d / "vmailbox").write_text("@example.test example.test/all/\n")
    err = run_expect_failure(d, f"queue_directory = {d}/queue\ndata_directory = {d}\ninet_protocols = ipv4\n"
                                f"mydestination =\nalias_maps =\nvirtual_mailbox_domains = example.test\n"
                                f"virtual_mailbox_base = {base}\nvirtual_mailbox_maps = texthash:{d}/vmailbox\n",
                             73)     # EX_CANTCREAT
    assert (f"fatal: mail_owner {MAIL_OWNER} cannot write virtual_mailbox_base {base} (Permission denied); "
            f"run: chown {MAIL_OWNER}: {base}") in err
    assert os.stat(base).st_uid == 0          # not changed behind the operator's back


def test_queue_and_data_directories_are_made_for_mail_owner(relay_factory, tmp_path):
    q = tmp_path / "q"
    data = tmp_path / "data"
    data.mkdir(mode=0o755)                     # exists with the wrong owner and mode: fixed and logged
    r = relay_factory(f"queue_directory = {q}\ndata_directory = {data}\n")
    owner_uid = int(subprocess.run(["id", "-u", MAIL_OWNER], capture_output=True, check=True).stdout)
    for d, mode in ((q, 0o711), (data, 0o700)):
        st = os.stat(d)
        assert (st.st_uid, st.st_mode & 0o7777) == (owner_uid, mode), d
    log = r.log()
    assert f"created queue_directory {q}" in log
    assert f"data_directory {data}: owner set to {MAIL_OWNER} (was uid 0 gid 0)" in log
    assert f"data_directory {data}: mode set to 0700 (was 0755)" in log


def tls_connect(port):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))


def der(cert_path):
    return ssl.PEM_cert_to_DER_cert(pathlib.Path(cert_path).read_text())


def plaintext_banner(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(512)


def wait_log_count(relay, text, n, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if relay.log().count(text) >= n:
            return True
        time.sleep(0.05)
    return False


def master_line(port, *opts):
    return f"127.0.0.1:{port} inet n - n - - smtpd\n" + "".join(f"  -o {o}\n" for o in opts)


def test_reload_swap_add_remove_services_and_certificate(relay_factory, tmp_path):
    cert, key = make_cert(tmp_path, "a", cn="a.example")
    cert_b, key_b = make_cert(tmp_path, "b", cn="b.example")
    der_a, der_b = der(cert), der(cert_b)
    r = relay_factory(f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n",
                      services={"plain": {}, "smtps": {"smtpd_tls_wrappermode": "yes"}})
    p1, p2, p3 = r.port("plain"), r.port("smtps"), free_port()
    with tls_connect(p2) as s:
        assert s.getpeercert(binary_form=True) == der_a
    # a session in the middle of a transaction on the first generation
    inflight = Smtp(p1)
    start_data(inflight, rcpts=("alice@example.test",))

    # swap the two services, add a STARTTLS one, and replace the certificate in place
    (r.dir / "master.cf").write_text(master_line(p1, "smtpd_tls_wrappermode=yes") + master_line(p2) +
                                     master_line(p3, "smtpd_tls_security_level=may"))
    pathlib.Path(cert).write_bytes(pathlib.Path(cert_b).read_bytes())
    pathlib.Path(key).write_bytes(pathlib.Path(key_b).read_bytes())
    os.kill(r.proc.pid, signal.SIGHUP)
    assert wait_log_count(r, "reload: configuration reloaded", 1), r.log()

    with tls_connect(p1) as s:                                   # was plaintext: now implicit TLS
        assert s.getpeercert(binary_form=True) == der_b         # with the new certificate
        banner = s.recv(512)
        assert banner.startswith(b"220 mx.example.test ESMTP"), banner
    assert plaintext_banner(p2).startswith(b"220 mx.example.test ESMTP")   # was implicit TLS: now plaintext
    c = Smtp(p3)
    assert "250-STARTTLS" in c.cmd("EHLO client.example.org")
    assert c.cmd("STARTTLS").startswith("220 ")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(c.sock) as s:
        assert s.getpeercert(binary_form=True) == der_b

    # the session that started before the reload finishes on the old generation
    queued(send_data_only(inflight, b"Subject: in flight\r\n\r\nacross a reload\r\n"))
    assert inflight.cmd("QUIT").startswith("221 ")
    assert len(r.maildir_files("example.test/alice/")) == 1
    assert wait_log_count(r, "generation 1: finished", 1), r.log()

    # remove two services
    (r.dir / "master.cf").write_text(master_line(p1, "smtpd_tls_wrappermode=yes"))
    os.kill(r.proc.pid, signal.SIGHUP)
    assert wait_log_count(r, "reload: configuration reloaded", 2), r.log()
    for p in (p2, p3):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p), timeout=5)
    with tls_connect(p1) as s:
        assert s.recv(512).startswith(b"220 ")

    # a configuration with errors is refused; the running one stays
    (r.dir / "master.cf").write_text(master_line(p1, "smtpd_tls_wrappermode=yes") + master_line(p2) +
                                     "bogus line\n")
    os.kill(r.proc.pid, signal.SIGHUP)
    assert wait_log_count(r, "reload: configuration has errors; keeping the running one", 1), r.log()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", p2), timeout=5)
    with tls_connect(p1) as s:
        assert s.recv(512).startswith(b"220 ")


def test_unit_hardening():
    """deploy/ktrelay.service (installed and verified by test_ops_systemd.py): the master keeps only the
    capabilities it uses, the file system is read-only but for the queue, data and mail."""
    from conftest import SRC
    text = (SRC / "deploy" / "ktrelay.service").read_text()
    for line in ("CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID CAP_SETPCAP CAP_CHOWN "
                 "CAP_FOWNER CAP_DAC_READ_SEARCH", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ReadWritePaths=/var/spool/ktrelay /var/lib/ktrelay -/var/vmail /home", "PrivateTmp=yes",
                 "SystemCallFilter=@system-service", "KillMode=mixed", "Type=notify", "NotifyAccess=main"):
        assert line + "\n" in text, line


def test_chroot_field_confines_the_worker(relay_factory, tmp_path):
    """master.cf's chroot y: the worker runs confined to the queue, data_directory and the virtual
    mailboxes (Landlock; the names stay as configured) and still receives, delivers and relays; the
    unprivileged field n on an smtpd line is a warning, never a root smtpd."""
    from test_ops_logs import Sink
    sink = Sink()
    try:
        r = relay_factory(f"queue_directory = {tmp_path}/queue\nrelayhost = [127.0.0.1]:{sink.port}\n"
                          "relay_domains = remote.test\n",
                          services={"smtp": {"_fields": "n n y - -"}})
        assert r.wait_log("worker confined to ")
        line = next(l for l in r.log().splitlines() if "worker confined to " in l)
        assert f"{tmp_path}/queue" in line and "(chroot y)" in line, line
        assert "unprivileged field n ignored: the SMTP workers always run as mail_owner, never as root" in r.log()
        pid = next(iter(socket_holders(listening_inodes(r.port("smtp")))))
        owner_uid = int(subprocess.run(["id", "-u", MAIL_OWNER], capture_output=True, check=True).stdout)
        for st in threads(pid):
            assert int(st["Uid"].split()[1]) == owner_uid and int(st["CapEff"], 16) == 0, st
        # direct Maildir delivery (create, write, fsync, rename between folders) works confined
        c = Smtp(r.port("smtp"))
        start_data(c)
        queued(send_data_only(c, b"Subject: confined\r\n\r\nhi\r\n"))
        files = r.maildir_files()
        assert len(files) == 1
        assert open(files[0], "rb").read().endswith(b"Subject: confined\r\n\r\nhi\r\n")
        # and so does the queue: written, relayed, removed
        c = Smtp(r.port("smtp"))
        c.cmd("EHLO client.test", 250)
        c.cmd("MAIL FROM:<a@example.org>", 250)
        c.cmd("RCPT TO:<b@remote.test>", 250)
        c.cmd("DATA", 354)
        c.send(b"Subject: relayed\r\n\r\nhi\r\n.\r\n")
        c.expect(250)
        assert r.wait_log("status=sent", timeout=20), r.log()
    finally:
        sink.stop()
