"""The sendmail drop-in: ktrelay installed as sendmail/mailq/newaliases (symlinks, as /usr/sbin/sendmail
would be), used by a non-root user with -t the way cron uses it (no terminal, no -c, the configuration
from KTRELAY_CONFIG), through maildrop/ and the daemon's pickup; myorigin = /file; -bs; a system user
created after the start receives mail at once (NSS lookups)."""
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import BIN, BASE_MAIN_CF, BASE_VMAILBOX, Relay, new_system_user, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                                reason="needs root and useradd for a real unprivileged user")


@pytest.fixture
def user():
    name = f"ktsm{os.getpid() % 100000}"
    subprocess.run(["userdel", "-r", name], capture_output=True)
    subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture
def world():
    """A configuration directory every user can read (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="ktsm"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start(world, extra=""):
    conf = world / "conf"
    conf.mkdir()
    (conf / "vmailbox").write_text(BASE_VMAILBOX + "carol@example.test   example.test/carol/\n"
                                   "dave@example.test    example.test/dave/\n")
    (world / "mailname").write_text("origin.example\n")
    main_cf = BASE_MAIN_CF.format(dir=conf) + (
        f"queue_directory = {world}/queue\n"
        f"myorigin = {world}/mailname\n"
        f"maillog_file_prefixes = {world}\n"
        f"maillog_file = {world}/maillog\n") + extra
    r = Relay(conf, main_cf, {"smtp": {}})
    # the listeners accept before the queue manager has made maildrop/
    assert wait_for(lambda: (world / "queue" / "maildrop").is_dir()), r.log()
    for p in [conf, *conf.iterdir()]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return r


def links(world):
    sbin = world / "usr" / "sbin"
    sbin.mkdir(parents=True)
    for name in ("sendmail", "mailq", "newaliases"):
        (sbin / name).symlink_to(BIN)
    return sbin


def as_user(user, argv, stdin, env):
    """Like cron: another user, a fresh session without a terminal, a minimal environment."""
    return subprocess.run(["runuser", "-u", user.pw_name, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()],
                           *argv], input=stdin, capture_output=True, start_new_session=True, timeout=30)


def maildir(relay, box):
    d = relay.dir / "mail" / "example.test" / box / "new"
    return sorted(d.iterdir()) if d.exists() else []


def test_cron_like_sendmail_t_as_non_root_through_maildrop(world, user):
    r = start(world)
    try:
        sbin = links(world)
        assert (world / "queue" / "maildrop").stat().st_mode & 0o7777 == 0o1733
        msg = (b"To: Bob <bob@example.test>, carol@example.test (Carol\n"
               b" C.)\n"
               b"Bcc: dave@example.test\n"
               b"Subject: cron job output\n"
               b"\n"
               b"disk is 91% full\n")
        env = {"PATH": "/usr/bin:/bin", "KTRELAY_CONFIG": str(r.dir), "HOME": "/", "LOGNAME": user.pw_name}
        p = as_user(user, [str(sbin / "sendmail"), "-t", "-i"], msg, env)
        assert p.returncode == 0, p.stderr
        assert p.stdout == b"" and p.stderr == b""        # quiet, as cron expects
        for box in ("bob", "carol", "dave"):
            assert wait_for(lambda: maildir(r, box)), (box, r.log()[-3000:])
        text = maildir(r, "bob")[0].read_bytes()
        head = text.split(b"\r\n\r\n", 1)[0]
        assert b"Bcc:" not in head
        assert f"(ktrelay, from userid {user.pw_uid})".encode() in head
        assert f"From: {user.pw_name}@origin.example\r\n".encode() in head     # myorigin = /file
        # the headers it lacked, added after its own (as Postfix's cleanup does)
        assert re.search(rb"\r\nSubject: cron job output\r\nFrom: [^\r]+\r\nDate: [^\r]+\r\nMessage-ID: <[^>]+>$", head), head
        assert text.endswith(b"\r\n\r\ndisk is 91% full\r\n")
        log = (world / "maillog").read_text()
        m = re.search(rf"ktrelay/pickup\[\d+\]: ([0-9A-F]+): uid={user.pw_uid} from=<{user.pw_name}@origin.example>",
                      log)
        assert m, log
        qid = m.group(1)
        assert len(re.findall(rf"{qid}: to=<(bob|carol|dave)@example.test>, relay=virtual, .*status=sent", log)) == 3
        assert re.search(rf"ktrelay/cleanup\[\d+\]: {qid}: message-id=<", log)
        assert not list((world / "queue" / "maildrop").iterdir())
        # the user can neither list maildrop nor read the queue
        p = as_user(user, ["ls", str(world / "queue" / "maildrop")], b"", env)
        assert p.returncode != 0
        # mailq and newaliases by name
        p = as_user(user, [str(sbin / "newaliases")], b"", env)
        assert p.returncode == 0 and b"nothing to rebuild" in p.stdout
        p = subprocess.run([str(sbin / "mailq")], capture_output=True, text=True,
                           env={**os.environ, "KTRELAY_CONFIG": str(r.dir)})
        assert p.returncode == 0 and p.stdout == "Mail queue is empty\n", p
    finally:
        assert r.stop() == 0


def test_pickup_refuses_what_it_cannot_trust(world, user):
    r = start(world)
    try:
        drop = world / "queue" / "maildrop"
        # a hard link to another file (two links), and garbage: both removed with a warning, nothing queued
        victim = world / "victim"
        victim.write_text("KTQUEUE 1\nsender x@y\nrcpt bob@example.test\nbody\nsecret\n")
        os.link(victim, drop / "LINKED")
        (drop / "GARBAGE").write_text("not an envelope\n")
        assert r.wait_log("LINKED: not a regular file with one link; removed", timeout=10), r.log()
        assert r.wait_log("GARBAGE: malformed submission", timeout=10), r.log()
        assert victim.exists() and not maildir(r, "bob")
    finally:
        assert r.stop() == 0


def test_sendmail_bs_speaks_smtp_on_stdin(world):
    r = start(world)
    try:
        sbin = links(world)
        dialogue = (b"EHLO client\r\nMAIL FROM:<root@origin.example>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                    b"Subject: bs\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
        p = subprocess.run([str(sbin / "sendmail"), "-bs", "-C", str(r.dir)], input=dialogue, capture_output=True,
                           timeout=30)
        assert p.returncode == 0, p.stderr
        replies = [ln.split(b" ")[0].split(b"-")[0] for ln in p.stdout.split(b"\r\n") if ln and ln[3:4] == b" "]
        assert replies == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"], p.stdout
        assert wait_for(lambda: maildir(r, "bob")), r.log()[-2000:]
        assert maildir(r, "bob")[0].read_bytes().endswith(b"\r\n.dot\r\n")
    finally:
        assert r.stop() == 0


def test_non_root_without_maildrop_says_what_to_do(world, user):
    conf = world / "conf"
    conf.mkdir()
    (conf / "main.cf").write_text(f"queue_directory = {world}/queue\nalias_maps =\n")
    os.chmod(conf, 0o755)
    os.chmod(conf / "main.cf", 0o644)
    env = {"PATH": "/usr/bin:/bin", "KTRELAY_CONFIG": str(conf)}
    p = as_user(user, [BIN, "sendmail", "bob@example.test"], b"Subject: x\n\nx\n", env)
    assert p.returncode == 69, p.stderr
    assert b"maildrop does not exist: start the ktrelay daemon once" in p.stderr


def test_user_created_after_start_receives_mail(relay_factory, tmp_path):
    import smtplib
    r = relay_factory("mydestination = localhost\nhome_mailbox = Maildir/\n")
    with new_system_user(tmp_path, "ktnew") as pw:
        with smtplib.SMTP("127.0.0.1", r.port(), timeout=30) as c:
            c.sendmail("alice@example.test", [f"{pw.pw_name}@localhost"], "Subject: welcome\r\n\r\nhi\r\n")
        files = list((Path(pw.pw_dir) / "Maildir" / "new").iterdir())
        assert len(files) == 1
        assert files[0].stat().st_uid == pw.pw_uid
