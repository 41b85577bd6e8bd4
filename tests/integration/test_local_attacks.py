"""Local delivery is done by the local delivery agent with the recipient's uid and never through a
symbolic link: ~/Maildir, ~/Maildir/new or ~/Maildir/tmp pointing at a root-owned directory, a Maildir
owned by another user, a home directory that is itself a symbolic link. Each time the message is
refused with 451 (deferred), the target directory is untouched (no files, owner and mode unchanged),
and the log names the reason. A normal user's delivery works and the file is the user's.
Real users made with useradd, so it needs root. (A symbolic link at the tmp file name is covered by
tests/unit/test_local.c, which can choose the name.)"""
import os
import pwd
import shutil
import subprocess

import pytest

from conftest import SmtpConn as Smtp
from test_smtp import queued, send_data

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                                reason="needs root and useradd to create real system users")


def make_user(name, home, create_home=True):
    subprocess.run(["userdel", name], capture_output=True)      # left over from an interrupted run
    subprocess.run(["useradd", "-m" if create_home else "-M", "-d", str(home), "-s", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    return pwd.getpwnam(name)


@pytest.fixture
def users(tmp_path):
    made = []

    def make(suffix, home=None):
        name = f"ktatk{os.getpid() % 10000}{suffix}"
        h = home or tmp_path / "home" / name
        h.parent.mkdir(parents=True, exist_ok=True)
        made.append(name)
        return make_user(name, h, create_home=home is None)

    yield make
    for name in made:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture
def root_dir(tmp_path):
    """A root-owned 0700 directory: what an attacker wants the server to write into."""
    d = tmp_path / "rootonly"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    return d


@pytest.fixture
def local_relay(relay_factory):
    """Start after the users are made: the passwd database is read at start."""
    return lambda: relay_factory("mydestination = localhost\nvirtual_mailbox_domains = example.test\n"
                                 "home_mailbox = Maildir/\n")


def untouched(d):
    st = os.lstat(d)
    return os.listdir(d) == [] and (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o700)


def chown_user(path, user):
    os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)


def send_to(relay, user):
    c = Smtp(relay.port())
    return send_data(c, b"Subject: attack\r\n\r\nhello\r\n", rcpts=(f"{user.pw_name}@localhost",))


def assert_deferred(relay, user, reason):
    r = send_to(relay, user)
    assert r == "451 4.3.0 Error: queue file write error"
    assert relay.wait_log(reason), relay.log()
    assert relay.wait_log(f"delivery to {user.pw_dir}/Maildir/ (uid {user.pw_uid}) deferred: {reason}"), relay.log()


def test_normal_user_gets_a_file_of_their_own(local_relay, users):
    u = users("a")
    relay = local_relay()
    queued(send_to(relay, u))
    new = os.path.join(u.pw_dir, "Maildir", "new")
    files = os.listdir(new)
    assert len(files) == 1
    for p in (os.path.join(new, files[0]), new, os.path.join(u.pw_dir, "Maildir")):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (u.pw_uid, u.pw_gid), p
    assert open(os.path.join(new, files[0]), "rb").read().endswith(b"Subject: attack\r\n\r\nhello\r\n")
    assert relay.wait_log(f"delivered to {u.pw_dir}/Maildir/ (uid {u.pw_uid})")


def test_maildir_symlink_to_root_dir(local_relay, users, root_dir):
    u = users("b")
    os.symlink(root_dir, os.path.join(u.pw_dir, "Maildir"))
    relay = local_relay()
    assert_deferred(relay, u, "Maildir is a symbolic link")
    assert untouched(root_dir)


def test_maildir_new_symlink_to_root_dir(local_relay, users, root_dir):
    u = users("c")
    md = os.path.join(u.pw_dir, "Maildir")
    for d in (md, md + "/tmp", md + "/cur"):
        os.mkdir(d, 0o700)
        chown_user(d, u)
    os.symlink(root_dir, md + "/new")
    chown_user(md + "/new", u)
    relay = local_relay()
    assert_deferred(relay, u, "Maildir/new is a symbolic link")
    assert untouched(root_dir)
    assert os.listdir(md + "/tmp") == []


def test_maildir_tmp_symlink_to_root_dir(local_relay, users, root_dir):
    u = users("d")
    md = os.path.join(u.pw_dir, "Maildir")
    os.mkdir(md, 0o700)
    chown_user(md, u)
    os.symlink(root_dir, md + "/tmp")
    chown_user(md + "/tmp", u)
    relay = local_relay()
    assert_deferred(relay, u, "Maildir/tmp is a symbolic link")
    assert untouched(root_dir)


def test_maildir_owned_by_another_user(local_relay, users):
    victim = users("e")
    u = users("f")
    md = os.path.join(u.pw_dir, "Maildir")
    os.mkdir(md, 0o700)
    chown_user(md, victim)
    relay = local_relay()
    assert_deferred(relay, u,
                    f"Maildir is owned by uid {victim.pw_uid}, not by the recipient (uid {u.pw_uid})")
    st = os.stat(md)
    assert (st.st_uid, st.st_gid) == (victim.pw_uid, victim.pw_gid)     # never chowned
    assert os.listdir(md) == []


def test_home_directory_is_a_symlink(local_relay, users, tmp_path, root_dir):
    link = tmp_path / "home" / "linked"
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(root_dir, link)
    u = users("g", home=link)
    relay = local_relay()
    r = send_to(relay, u)
    assert r == "451 4.3.0 Error: queue file write error"
    assert relay.wait_log(f"home directory {link} is a symbolic link or lies below one"), relay.log()
    assert untouched(root_dir)


def test_missing_home_is_not_created(local_relay, users, tmp_path):
    u = users("h")
    shutil.rmtree(u.pw_dir)
    relay = local_relay()
    r = send_to(relay, u)
    assert r == "451 4.3.0 Error: queue file write error"
    assert relay.wait_log(f"home directory {u.pw_dir} does not exist"), relay.log()
    assert not os.path.exists(u.pw_dir)


def test_one_refused_mailbox_writes_no_copy_for_the_others(relay_factory, users, root_dir, tmp_path):
    """A message for an alias of a normal user and an attacker (one recipient, two mailboxes, delivered by
    the session): deferred as a whole with nothing written, so the client's retry (after the attacker's
    link is gone) gives the normal user exactly one copy."""
    good, bad = users("g"), users("h")
    link = os.path.join(bad.pw_dir, "Maildir")
    os.symlink(root_dir, link)
    aliases = tmp_path / "aliases"
    aliases.write_text(f"both: {good.pw_name}, {bad.pw_name}\n")
    relay = relay_factory("mydestination = localhost\nvirtual_mailbox_domains = example.test\n"
                          f"home_mailbox = Maildir/\nalias_maps = texthash:{aliases}\n")
    c = Smtp(relay.port())
    r = send_data(c, b"Subject: two\r\n\r\nhello\r\n", rcpts=("both@localhost",))
    assert r == "451 4.3.0 Error: queue file write error"
    assert relay.wait_log(f"delivery to {bad.pw_dir}/Maildir/ (uid {bad.pw_uid}) deferred: Maildir is a symbolic "
                          "link; no mailbox of this message was written"), relay.log()
    assert os.listdir(os.path.join(good.pw_dir, "Maildir", "new")) == []
    assert os.listdir(os.path.join(good.pw_dir, "Maildir", "tmp")) == []
    assert untouched(root_dir)
    os.unlink(link)
    c = Smtp(relay.port())
    queued(send_data(c, b"Subject: two\r\n\r\nhello\r\n", rcpts=("both@localhost",)))
    for u in (good, bad):
        assert len(os.listdir(os.path.join(u.pw_dir, "Maildir", "new"))) == 1, u.pw_name
