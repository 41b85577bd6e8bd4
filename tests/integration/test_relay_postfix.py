"""A real Postfix (Debian's) as ktrelay's next hop: a private instance (own config, queue and Maildir
folders, a loopback port) receives ktrelay's outbound mail over STARTTLS, small and BDAT-sized
messages, and delivers them into its own virtual Maildir. The instance is stopped at teardown
whatever happened."""
import grp
import os
import pathlib
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import free_port, make_cert
from test_relay import nodes, wait_for  # noqa: F401  (fixture)
from test_relay_dns import DnsServer

pytestmark = [
    pytest.mark.skipif(not shutil.which("postfix", path="/usr/sbin:/usr/bin"), reason="postfix not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Postfix instance needs root"),
]

PF_MAIN_CF = """\
compatibility_level = 3.6
myhostname = pf.test
mydomain = pf.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
queue_directory = {t}/queue
data_directory = {t}/data
maillog_file = {t}/postfix.log
maillog_file_prefixes = {t}
alias_maps =
alias_database =
local_recipient_maps =
message_size_limit = 52428800
virtual_mailbox_domains = pf.test
virtual_mailbox_base = {t}/mail
virtual_mailbox_maps = texthash:{t}/vmailbox
virtual_mailbox_limit = 0
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
smtpd_tls_cert_file = {t}/cert.pem
smtpd_tls_key_file = {t}/cert.key
smtpd_tls_security_level = may
smtpd_tls_loglevel = 1
smtpd_tls_session_cache_database =
"""


class Postfix:
    def __init__(self):
        # Postfix's daemons run as "postfix"/"nobody": nothing under the private pytest folders
        self.t = pathlib.Path(tempfile.mkdtemp(prefix="ktrelay-pf-"))
        os.chmod(self.t, 0o755)
        self.conf = self.t / "conf"
        self.port = free_port()
        self.started = False

    def start(self):
        t = self.t
        for sub in ("conf", "queue", "data", "mail"):
            (t / sub).mkdir()
        uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
        shutil.chown(t / "data", "postfix")
        shutil.chown(t / "mail", uid, gid)
        make_cert(t, name="cert", cn="pf.test")
        (t / "vmailbox").write_text("bob@pf.test pf.test/bob/\n")
        (self.conf / "main.cf").write_text(PF_MAIN_CF.format(t=t, uid=uid, gid=gid))
        services = [line for line in distribution_master_cf().read_text().splitlines()
                    if re.match(r"[a-z]", line) and line.split()[1] != "inet"]
        (self.conf / "master.cf").write_text(f"127.0.0.1:{self.port} inet n - n - - smtpd\n" + "\n".join(services) + "\n")
        subprocess.run(["postconf", "-c", str(self.conf), "-F", "*/*/chroot = n"], check=True, capture_output=True)
        self.started = True
        # postfix reports start-up errors only to a terminal (or syslog): script(1) gives it one
        p = subprocess.run(["script", "-qec", f"postfix -c {self.conf} start", "/dev/null"], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("postfix did not listen:\n" + self.log())
                time.sleep(0.1)

    def master_pid(self):
        try:
            return int((self.t / "queue" / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self):
        if not self.started:
            return
        pid = self.master_pid()
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True, timeout=60)
        deadline = time.time() + 20
        while pid and time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            if pid:
                subprocess.run(["postfix", "-c", str(self.conf), "abort"], capture_output=True, timeout=60)
        self.started = False

    def log(self):
        p = self.t / "postfix.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def maildir(self):
        d = self.t / "mail" / "pf.test" / "bob" / "new"
        return sorted(d.iterdir()) if d.exists() else []


def distribution_master_cf():
    """The distribution's master.cf, or the packaged template when Postfix was installed unconfigured."""
    p = pathlib.Path("/etc/postfix/master.cf")
    return p if p.exists() else pathlib.Path("/usr/share/postfix/master.cf.dist")


@pytest.fixture
def postfix():
    pf = Postfix()
    try:
        yield pf.start()
    finally:
        pf.stop()
        if os.environ.get("KT_KEEP"):
            print(pf.t)
        else:
            shutil.rmtree(pf.t, ignore_errors=True)


def big_body(size):
    lines = [b"Subject: large via BDAT", b""]
    total, i = 0, 0
    while total < size:
        lines.append(b"%s%08d %s" % (b"." if i % 5 == 0 else b"", i, b"z" * 70))
        total += len(lines[-1]) + 1
        i += 1
    return b"\n".join(lines) + b"\n"


SMALL = b"Subject: to postfix\n\nhello postfix\n.one dot\n..two dots\nbye\n"


@pytest.mark.parametrize("level", ["may", "encrypt"])
def test_relay_to_postfix_over_starttls(nodes, postfix, level):
    dns = None
    if level == "may":
        # this case also finds Postfix through an MX lookup
        dns = DnsServer({("pf.test", "MX"): [(10, "mx.pf.test")], ("mx.pf.test", "A"): ["127.0.0.1"]})
        route = f"ktrelay_dns_servers = 127.0.0.1:{dns.port}\nrelayhost = pf.test:{postfix.port}\n"
        shown = rf"mx\.pf\.test\[127\.0\.0\.1\]:{postfix.port}"
    else:
        route = f"transport_maps = inline:{{ pf.test=smtp:[127.0.0.1]:{postfix.port} }}\n"
        shown = rf"127\.0\.0\.1\[127\.0\.0\.1\]:{postfix.port}"
    try:
        n = nodes(route + f"smtp_tls_security_level = {level}\nsmtp_tls_loglevel = 1\n"
                  "message_size_limit = 52428800\n").start()
        bodies = [SMALL, big_body(3 * 1024 * 1024)]
        ids = [n.sendmail(["bob@pf.test"], b) for b in bodies]
        for qid in ids:
            assert n.wait_log(rf"{qid}: to=<bob@pf.test>, relay={shown}, .*dsn=2\.0\.0, status=sent "
                              r"\(250 2\.0\.0 Ok: \d+ bytes queued as \w+\)", timeout=60), n.log()[-3000:] + postfix.log()
            assert n.wait_log(rf"{qid}: removed")
    finally:
        if dns:
            dns.close()
    # ktrelay's side of the TLS connection, and Postfix's
    assert re.search(rf"TLS connection established to {shown}: TLSv1\.[23] with cipher", n.log()), n.log()[-3000:]
    assert wait_for(lambda: re.search(r"TLS connection established from localhost\[127\.0\.0\.1\]: TLSv1\.[23]",
                                      postfix.log())), postfix.log()
    # Postfix offers CHUNKING: ktrelay sent the bodies with BDAT
    sessions = r"disconnect from localhost\[127\.0\.0\.1\] ehlo=2 starttls=1 mail=(\d+) rcpt=\d+ bdat=(\d+) quit=1"
    assert wait_for(lambda: sum(int(b) for _, b in re.findall(sessions, postfix.log())) == 2), postfix.log()
    assert all(m == b for m, b in re.findall(sessions, postfix.log())), postfix.log()
    files = wait_for(lambda: len(postfix.maildir()) == 2 and postfix.maildir(), timeout=60)
    assert files, postfix.log()
    got = [f.read_bytes() for f in files]
    for body in bodies:
        # Postfix stores LF line ends, adds its own headers (Return-Path:, Delivered-To:, Received:, and the
        # missing Message-Id:, Date:, From:); the body after the blank line must be exactly what was sent
        subject, text = body.split(b"\n\n", 1)
        match = [g for g in got if g.split(b"\n\n", 1)[1] == text]
        assert len(match) == 1, f"message of {len(body)} bytes not stored intact"
        head = match[0].split(b"\n\n", 1)[0]
        assert head.startswith(b"Return-Path: <alice@example.test>\n") and b"\nDelivered-To: bob@pf.test\n" in head
        assert b"\n" + subject + b"\n" in head
    assert n.queue_files() == []
