"""Interoperability with a real IMAP server: a message delivered by ktrelay is
read back through Dovecot (Debian's dovecot-imapd) with imaplib. Dovecot
trusts the ,S= and ,W= sizes in the file name and takes INTERNALDATE from the
file's mtime, so both must be right."""
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

from conftest import SmtpConn, free_port, stop_process
from test_smtp import queued, send_data

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(DOVECOT),
                                reason="needs root and dovecot (dovecot-imapd)")

UID = 65534     # nobody: Dovecot refuses to access mail as root


@pytest.fixture
def open_dir():
    """A temporary directory that Dovecot's unprivileged processes can traverse
    (pytest's own tmp_path is private to root)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="ktrelay-dovecot-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def dovecot(open_dir):
    """Start a private Dovecot serving alice, whose mail is the Maildir
    open_dir/mail/example.test/alice/; yields (port, maildir)."""
    tmp_path = open_dir
    d = tmp_path / "dovecot"
    d.mkdir()
    maildir = tmp_path / "mail" / "example.test" / "alice"
    # the mailbox belongs to UID, which makes it (as with Postfix's virtual(8)) in a folder it may write
    maildir.parent.mkdir(parents=True)
    for p in (maildir.parent, maildir.parent.parent):
        p.chmod(0o755)
    os.chown(maildir.parent, UID, UID)
    port = free_port()
    (d / "users").write_text(f"alice:{{PLAIN}}s3cret:{UID}:{UID}::{tmp_path}::\n")
    conf = d / "dovecot.conf"
    conf.write_text(f"""\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{maildir}
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
""")
    proc = subprocess.Popen([DOVECOT, "-F", "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log = (d / "dovecot.log").read_text() if (d / "dovecot.log").exists() else ""
                pytest.fail(f"dovecot did not start: {proc.stdout.read().decode()}{log}")
            time.sleep(0.1)
    try:
        yield port, maildir
    finally:
        stop_process(proc)


def test_message_read_back_through_imap(relay_factory, dovecot, open_dir):
    port, maildir = dovecot
    relay = relay_factory(f"virtual_mailbox_base = {open_dir}/mail\n"
                          f"virtual_uid_maps = static:{UID}\nvirtual_gid_maps = static:{UID}\n")
    content = ("From: Jörg <jorg@example.org>\r\nTo: alice@example.test\r\nSubject: 8bit and dots\r\n"
               "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
               "Grüße aus Köln – 日本語\r\n.a line that started with a dot\r\n..\r\nlast line\r\n").encode()
    c = SmtpConn(relay.port())
    queued(send_data(c, content, rcpts=("alice@example.test",), params=" BODY=8BITMIME"))
    c.cmd("QUIT")
    files = sorted((maildir / "new").iterdir())
    assert len(files) == 1
    path = files[0]
    raw = path.read_bytes()
    assert raw.endswith(content)
    mtime = int(os.stat(path).st_mtime)
    size = int(path.name.split(",S=")[1].split(",")[0])
    assert size == len(raw)
    assert os.stat(path).st_uid == UID

    imap = imaplib.IMAP4("127.0.0.1", port)
    try:
        imap.login("alice", "s3cret")
        typ, data = imap.select("INBOX")
        assert typ == "OK" and data == [b"1"], (data, (open_dir / "dovecot" / "dovecot.log").read_text())
        typ, data = imap.fetch("1", "(RFC822.SIZE INTERNALDATE BODY.PEEK[] BODY.PEEK[TEXT])")
        assert typ == "OK", data
        meta = b"".join(item[0] if isinstance(item, tuple) else item for item in data)
        bodies = [item[1] for item in data if isinstance(item, tuple)]
        assert raw in bodies                                   # BODY[] is the file, byte for byte
        assert content.split(b"\r\n\r\n", 1)[1] in bodies      # BODY[TEXT] is the 8-bit, unstuffed text
        assert re.search(rb"RFC822\.SIZE %d\b" % len(raw), meta), meta
        internal = imaplib.Internaldate2tuple(meta)
        assert internal is not None, meta
        assert int(time.mktime(internal)) == mtime
        imap.logout()
    finally:
        try:
            imap.shutdown()
        except OSError:
            pass
