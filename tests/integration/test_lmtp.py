"""LMTP delivery (RFC 2033, as Postfix's lmtp(8)) to a real Dovecot LMTP server (Debian's
dovecot-lmtpd), which stores into Maildirs that the same Dovecot's IMAP (dovecot-imapd) then serves:
virtual_transport and transport_maps naming lmtp:unix:PATH and lmtp:[host]:port, one reply per
recipient after the end of data applied to that recipient alone (delivered, bounced over quota,
refused at RCPT), and a Dovecot that is down: deferred, then delivered once it runs."""
import imaplib
import os
import pathlib
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import BASE_VMAILBOX, SmtpConn, free_port, new_system_user, stop_process, wait_until
from test_smtp import queued, start_data, stuff

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(DOVECOT)
                                or not os.path.exists("/usr/lib/dovecot/lmtp"),
                                reason="needs root, dovecot-imapd and dovecot-lmtpd")

UID = 65534     # nobody: the mail user (Dovecot refuses to deliver as root)
PASSWORD = "s3cret"
RETRY = "minimal_backoff_time = 1s\nmaximal_backoff_time = 2s\nqueue_run_delay = 1s\n"


class Dovecot:
    """A private Dovecot with IMAP and LMTP (a unix socket and a TCP listener) for alice and carol of
    example.test; carol's quota is 1 KB. Mail goes to root/mail/example.test/USER/ (Maildir)."""

    def __init__(self, root, more_users=(), sock=None):
        self.root = root
        self.d = root / "dovecot"
        self.d.mkdir()
        self.mail = root / "mail"
        self.mail.mkdir()
        os.chown(self.mail, UID, UID)
        self.imap_port = free_port()
        self.lmtp_port = free_port()
        self.sock = sock or self.d / "lmtp.sock"
        home = root / "home"
        home.mkdir()
        os.chown(home, UID, UID)
        (self.d / "users").write_text(
            f"alice@example.test:{{PLAIN}}{PASSWORD}:{UID}:{UID}::{home}::\n"
            f"carol@example.test:{{PLAIN}}{PASSWORD}:{UID}:{UID}::{home}::userdb_quota_rule=*:storage=1K\n"
            + "".join(f"{u}:{{PLAIN}}{PASSWORD}:{UID}:{UID}::{home}::\n" for u in more_users))
        (self.d / "dovecot.conf").write_text(f"""\
base_dir = {self.d}/run
state_dir = {self.d}/state
log_path = {self.d}/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{self.mail}/%d/%n
mail_plugins = quota
postmaster_address = postmaster@example.test
first_valid_uid = 1
plugin {{
  quota = maildir:User quota
}}
passdb {{
  driver = passwd-file
  args = {self.d}/users
}}
userdb {{
  driver = passwd-file
  args = {self.d}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener {self.sock} {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
service anvil {{
  chroot =
}}
""")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.d / "dovecot.conf")],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 15
        for port in (self.imap_port, self.lmtp_port):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.time() > deadline:
                        self.proc.kill()
                        pytest.fail(f"dovecot did not start: {self.proc.stdout.read().decode()}{self.log()}")
                    time.sleep(0.1)
        wait_until(self.sock.exists, what="the LMTP socket")
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            stop_process(self.proc)
        self.proc = None

    def log(self):
        p = self.d / "dovecot.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def fetch_all(self, user):
        """Every message of user's INBOX over IMAP: [(BODY[], BODY[TEXT])]."""
        imap = imaplib.IMAP4("127.0.0.1", self.imap_port)
        try:
            imap.login(user, PASSWORD)
            typ, data = imap.select("INBOX")
            assert typ == "OK", data
            out = []
            for n in range(1, int(data[0]) + 1):
                typ, data = imap.fetch(str(n), "(BODY.PEEK[] BODY.PEEK[TEXT])")
                assert typ == "OK", data
                parts = {}
                for item in data:
                    if isinstance(item, tuple):
                        parts["TEXT" if b"BODY[TEXT]" in item[0] else "ALL"] = item[1]
                out.append((parts["ALL"], parts["TEXT"]))
            return out
        finally:
            imap.logout()


@pytest.fixture
def dovecot_factory():
    made = []

    def make(more_users=(), sock=None):
        # Dovecot's unprivileged processes must reach the files: a directory outside pytest's private tmp
        root = pathlib.Path(tempfile.mkdtemp(prefix="ktrelay-lmtp-"))
        root.chmod(0o755)
        made.append(Dovecot(root, more_users, sock))
        return made[-1]
    yield make
    for dv in made:
        dv.stop()
        shutil.rmtree(dv.root, ignore_errors=True)


@pytest.fixture
def dovecot(dovecot_factory):
    return dovecot_factory()


@pytest.fixture
def local_user(tmp_path):
    with new_system_user(tmp_path, "ktlmtp") as pw:
        yield pw


CONTENT = ("From: Jörg <jorg@example.org>\r\nTo: alice@example.test\r\nSubject: over LMTP\r\n"
           "Message-ID: <lmtp-1@example.org>\r\nContent-Type: text/plain; charset=utf-8\r\n"
           "Content-Transfer-Encoding: 8bit\r\n\r\n"
           "Grüße – 日本語\r\n.a line that started with a dot\r\n..\r\nlast line\r\n").encode()


def send(relay, rcpts, content=CONTENT, sender="sender@example.org"):
    c = SmtpConn(relay.port())
    start_data(c, rcpts, sender=sender)
    assert c.cmd("DATA").startswith("354 ")
    c.send(stuff(content) + b".\r\n")
    qid = queued(c.reply())
    c.cmd("QUIT")
    return qid


def test_virtual_transport_over_unix_socket_read_back_through_imap(relay_factory, dovecot):
    dovecot.start()
    # with an lmtp: virtual transport, virtual_mailbox_maps only lists who exists: any value will do
    vmailbox = re.sub(r"(?m)^alice@example\.test\s.*$", "alice@example.test OK", BASE_VMAILBOX)
    assert "alice@example.test OK" in vmailbox
    relay = relay_factory(f"virtual_transport = lmtp:unix:{dovecot.sock}\n", vmailbox=vmailbox)
    c = SmtpConn(relay.port())
    assert c.cmd("VRFY alice@example.test") == "252 2.0.0 alice@example.test"
    assert c.cmd("VRFY nobody@example.test") == ("550 5.1.1 <nobody@example.test>: Recipient address rejected: "
                                                 "User unknown in virtual mailbox table")
    c.cmd("QUIT")
    qid = send(relay, ["alice@example.test"])
    # Postfix's lmtp(8) line: relay=myhostname[socket path], the server's own reply for this recipient
    sent = re.compile(rf"ktrelay/lmtp\[\d+\]: {qid}: to=<alice@example\.test>, "
                      rf"relay=mx\.example\.test\[{re.escape(str(dovecot.sock))}\], delay=\d+, dsn=2\.0\.0, "
                      rf"status=sent \(250 2\.0\.0 <alice@example\.test> \S+ Saved\)")
    wait_until(lambda: sent.search(relay.log()), what="the LMTP delivery")
    assert relay.wait_log(f"{qid}: removed")
    # the session did not write the virtual mailbox itself: the queue and LMTP did the delivery
    assert relay.maildir_files("example.test/alice/") == []
    [(whole, text)] = dovecot.fetch_all("alice@example.test")
    assert whole.endswith(CONTENT)
    assert text == CONTENT.split(b"\r\n\r\n", 1)[1]
    head = whole.split(b"\r\n\r\n", 1)[0]
    # Dovecot writes Return-Path and Delivered-To; ktrelay adds no Delivered-To to an LMTP hand-off
    assert head.count(b"Delivered-To:") == 1 and b"\r\nDelivered-To: alice@example.test\r\n" in head
    assert head.count(b"Return-Path:") == 1 and b"Return-Path: <sender@example.org>" in head
    assert re.search(rb"by mx\.example\.test \(ktrelay\) with ESMTP id " + qid.encode(), head), head


def test_relative_socket_path_is_below_queue_directory(relay_factory, dovecot_factory):
    """lmtp:unix:private/dovecot-lmtp, the usual Postfix set-up, is a socket below queue_directory; the
    log names it as Postfix does."""
    relay = relay_factory("virtual_transport = lmtp:unix:private/dovecot-lmtp\n")
    private = relay.dir / "queue" / "private"
    private.mkdir(exist_ok=True)
    private.chmod(0o755)
    dv = dovecot_factory(sock=private / "dovecot-lmtp").start()
    qid = send(relay, ["alice@example.test"])
    wait_until(lambda: re.search(rf"ktrelay/lmtp\[\d+\]: {qid}: to=<alice@example\.test>, "
                                 r"relay=mx\.example\.test\[private/dovecot-lmtp\], delay=\d+, dsn=2\.0\.0, "
                                 r"status=sent \(250 2\.0\.0 <alice@example\.test> \S+ Saved\)", relay.log()),
               what="the delivery")
    [(whole, _)] = dv.fetch_all("alice@example.test")
    assert whole.endswith(CONTENT)


def test_each_recipient_gets_its_own_outcome(relay_factory, dovecot):
    """alice is delivered, carol is over quota (Dovecot's 552 5.2.2 after the end of data: bounced),
    bob is unknown to Dovecot (550 5.1.1 at RCPT: bounced); the bounce reaches alice over LMTP too."""
    dovecot.start()
    relay = relay_factory(RETRY + f"transport_maps = inline:{{ example.test=lmtp:[127.0.0.1]:{dovecot.lmtp_port} }}\n",
                          vmailbox=BASE_VMAILBOX + "carol@example.test example.test/carol/\n")
    big = CONTENT + b"x" * 4000 + b"\r\n"
    qid = send(relay, ["alice@example.test", "carol@example.test", "bob@example.test"], content=big,
               sender="alice@example.test")
    hop = rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{dovecot.lmtp_port}"
    log = lambda: relay.log()   # noqa: E731
    wait_until(lambda: re.search(rf"{qid}: to=<alice@example\.test>, {hop}, .*status=sent \(250 2\.0\.0 <alice@example\.test> ", log()),
               what="alice delivered")
    wait_until(lambda: re.search(rf"ktrelay/lmtp\[\d+\]: {qid}: to=<carol@example\.test>, {hop}, delay=\d+, dsn=5\.2\.2, "
                                 rf"status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\]:{dovecot.lmtp_port} said: 552 5\.2\.2 "
                                 r"<carol@example\.test> .*\(in reply to end of DATA command\)\)", log()),
               what="carol bounced at the end of data")
    wait_until(lambda: re.search(rf"{qid}: to=<bob@example\.test>, {hop}, delay=\d+, dsn=5\.1\.1, status=bounced "
                                 r"\(host .* said: 550 5\.1\.1 .*\(in reply to RCPT TO command\)\)", log()),
               what="bob bounced at RCPT")
    assert not re.search(rf"{qid}: to=<(alice|carol|bob)@example\.test>.*status=deferred", log())
    # the non-delivery report goes to alice through the same LMTP server
    msgs = wait_until(lambda: (m := dovecot.fetch_all("alice@example.test")) and len(m) == 2 and m,
                      what="the message and the bounce in alice's INBOX")
    assert any(w.endswith(big) for w, _ in msgs)
    report = next(w for w, _ in msgs if not w.endswith(big))
    assert b"Final-Recipient: rfc822; carol@example.test" in report
    assert b"Final-Recipient: rfc822; bob@example.test" in report
    assert b"Return-Path: <>" in report
    assert dovecot.fetch_all("carol@example.test") == []


def saved_tokens(dv, msgid):
    """{user: Dovecot's <pid><session> token} of each 'saved mail' line for msgid: one session per LMTP
    connection, ":T<n>" added for its n-th transaction; the recipient's ":R<n>" within it is left out."""
    return {m.group(1): re.sub(r":R\d+>$", ">", m.group(2)) for m in re.finditer(
        rf"lmtp\(([^)]+)\)(<\d+><[^>]+>): Info: msgid={re.escape(msgid)}: saved mail to INBOX", dv.log())}


def test_recipient_limit_splits_transactions_on_one_cached_connection(relay_factory, dovecot_factory):
    dv = dovecot_factory(more_users=("dave@example.test",)).start()
    hop = f"transport_maps = inline:{{ example.test=lmtp:[127.0.0.1]:{dv.lmtp_port} }}\n"
    vmailbox = BASE_VMAILBOX + "dave@example.test example.test/dave/\n"
    rcpts = ["alice@example.test", "dave@example.test"]
    # the default limit (50): both recipients in one transaction
    one = relay_factory(hop, vmailbox=vmailbox)
    send(one, rcpts, content=CONTENT.replace(b"<lmtp-1@", b"<together@"))
    tokens = wait_until(lambda: (t := saved_tokens(dv, "<together@example.org>")) and len(t) == 2 and t,
                        what="both deliveries")
    assert tokens["alice@example.test"] == tokens["dave@example.test"], tokens
    # lmtp_destination_recipient_limit = 1: one transaction each, one after the other on the same connection
    two = relay_factory(hop + "lmtp_destination_recipient_limit = 1\nlmtp_destination_concurrency_limit = 1\n",
                        vmailbox=vmailbox)
    qid = send(two, rcpts, content=CONTENT.replace(b"<lmtp-1@", b"<apart@"))
    tokens = wait_until(lambda: (t := saved_tokens(dv, "<apart@example.org>")) and len(t) == 2 and t,
                        what="both deliveries")
    a, d = tokens["alice@example.test"], tokens["dave@example.test"]
    # the second transaction of the same LMTP session: the connection was reused
    assert d == a[:-1] + ":T2>", tokens
    for r in rcpts:
        assert two.wait_log(f"{qid}: to=<{r}>, relay=127.0.0.1[127.0.0.1]:{dv.lmtp_port}, ")


def test_dovecot_down_defers_then_delivers(relay_factory, dovecot):
    relay = relay_factory(RETRY + f"virtual_transport = lmtp:inet:127.0.0.1:{dovecot.lmtp_port}\n"
                          "lmtp_lhlo_name = lmtp-client.example.test\n")
    qid = send(relay, ["alice@example.test"])
    deferred = re.compile(rf"ktrelay/lmtp\[\d+\]: {qid}: to=<alice@example\.test>, relay=none, delay=\d+, dsn=4\.\d\.\d, "
                          rf"status=deferred \(connect to 127\.0\.0\.1\[127\.0\.0\.1\]:{dovecot.lmtp_port}: Connection refused\)")
    wait_until(lambda: deferred.search(relay.log()), what="the deferral")
    assert len(list((relay.dir / "queue" / "new").iterdir())) == 1
    dovecot.start()
    wait_until(lambda: re.search(rf"{qid}: to=<alice@example\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{dovecot.lmtp_port}, "
                                 r".*status=sent \(250 2\.0\.0 <alice@example\.test> ", relay.log()),
               timeout=20, what="the delivery after Dovecot started")
    [(whole, text)] = dovecot.fetch_all("alice@example.test")
    assert whole.endswith(CONTENT)
    assert b"from lmtp-client.example.test" in whole        # Dovecot's Received: names the LHLO name
    wait_until(lambda: not list((relay.dir / "queue" / "new").iterdir()), what="the queue file removed")


def test_mailbox_transport_after_alias_expansion(relay_factory, dovecot_factory, local_user, tmp_path):
    """mailbox_transport: local(8) keeps the local recipient checks and alias expansion, then hands the
    user's mailbox delivery to Dovecot: the user's own address as given, an alias as user@$myorigin."""
    name = local_user.pw_name
    dv = dovecot_factory(more_users=(f"{name}@localhost", f"{name}@mx.example.test")).start()
    aliases = tmp_path / "aliases"
    aliases.write_text(f"postmaster: {name}\nfriends: {name}, alice@example.test\n")
    relay = relay_factory(RETRY + "mydestination = localhost\nvirtual_mailbox_domains = example.test\n"
                          f"alias_maps = texthash:{aliases}\nmailbox_transport = lmtp:unix:{dv.sock}\n")
    c = SmtpConn(relay.port())
    start_data(c, [f"{name}@localhost"])
    assert c.cmd("RCPT TO:<nobody-such@localhost>") == ("550 5.1.1 <nobody-such@localhost>: Recipient address "
                                                        "rejected: User unknown in local recipient table")
    assert c.cmd("DATA").startswith("354 ")
    c.send(stuff(CONTENT) + b".\r\n")
    qid = queued(c.reply())
    c.cmd("QUIT")
    relay_re = rf"relay=mx\.example\.test\[{re.escape(str(dv.sock))}\]"
    wait_until(lambda: re.search(rf"ktrelay/lmtp\[\d+\]: {qid}: to=<{name}@localhost>, {relay_re}, .*status=sent "
                                 rf"\(250 2\.0\.0 <{name}@localhost> \S+ Saved\)", relay.log()), what="the user's delivery")
    qid2 = send(relay, ["postmaster@localhost"])
    wait_until(lambda: re.search(rf"{qid2}: to=<postmaster@localhost>, {relay_re}, .*status=sent "
                                 rf"\(250 2\.0\.0 <{name}@mx\.example\.test> \S+ Saved\)", relay.log()),
               what="the alias's delivery")
    [(whole, _)] = dv.fetch_all(f"{name}@localhost")
    assert whole.endswith(CONTENT)
    [(whole, _)] = dv.fetch_all(f"{name}@mx.example.test")
    assert whole.endswith(CONTENT)
    # local(8) wrote no Maildir of its own
    assert not os.path.exists(os.path.join(local_user.pw_dir, "Maildir"))
    # forward_path is left at Postfix's default: .forward files of these users are not looked for, and the
    # start says so
    assert (f"warning: mailbox_transport: mail handed to lmtp:unix:{dv.sock} is not checked for .forward files "
            f"(forward_path), which Postfix's local(8) would deliver through; set forward_path empty to say that "
            f"is meant") in relay.log()
    # an alias to several mailboxes is not handed over: deferred, and said so
    qid3 = send(relay, ["friends@localhost"])
    assert relay.wait_log(f"{qid3}: to=<friends@localhost>, relay=local, ")
    wait_until(lambda: re.search(rf"{qid3}: to=<friends@localhost>, relay=local, delay=\d+, dsn=4\.3\.0, status=deferred "
                                 r"\(mailbox_transport: an alias that expands to several mailboxes is not handed over\)",
                                 relay.log()), what="the deferral")


def test_lmtp_values_it_cannot_honour_fail(relay_factory, tmp_path):
    from conftest import BIN
    d = tmp_path / "cf"
    d.mkdir()
    (d / "master.cf").write_text("smtp inet n - n - - smtpd\n")
    base = f"queue_directory = {d}/q\ndata_directory = {d}/d\n"
    for line, message in [
            ("lmtp_tls_security_level = may", "ktrelay's LMTP client does not implement TLS; it takes none"),
            ("virtual_transport = dovecot", "virtual_transport: bad value \"dovecot\""),
            ("mailbox_transport = dovecot", "mailbox_transport: bad value \"dovecot\""),
            ("mailbox_transport = lmtp", "mailbox_transport: bad value \"lmtp\""),
            ("fallback_transport = lmtp:unix:private/dovecot-lmtp", "fallback_transport"),
            ("transport_maps = inline:{ a.test=lmtp:inet:host:x }", "transport_maps: a.test: bad value"),
            ("transport_maps = inline:{ a.test=pipe:x }", "transport_maps: a.test: bad value")]:
        (d / "main.cf").write_text(base + line + "\n")
        p = subprocess.run([BIN, "check-config", "-c", str(d)], capture_output=True, text=True)
        assert p.returncode == 78, (line, p.stdout, p.stderr)
        assert message in p.stderr, (line, p.stderr)
        assert "main.cf:3:" in p.stderr, (line, p.stderr)
