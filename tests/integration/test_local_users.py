"""Local delivery to a real system user: mydestination, home_mailbox = Maildir/,
alias_maps with aliases to the user, files owned by the user, and 550 for an
unknown local user. Creates a user with useradd, so it needs root."""
import os
import shutil
import smtplib
from pathlib import Path

import pytest

from conftest import SmtpConn, new_system_user
from test_smtp import queued, send_data, send_data_only, split_received

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                                reason="needs root and useradd to create a real system user")


@pytest.fixture
def local_user(tmp_path):
    with new_system_user(tmp_path, "kttest") as pw:
        yield pw


@pytest.fixture
def local_relay(relay_factory, tmp_path, local_user):
    aliases = tmp_path / "aliases"
    aliases.write_text(f"# Postfix-style aliases\n"
                       f"postmaster: root\n"
                       f"root: {local_user.pw_name}\n"
                       f"abuse: postmaster\n"
                       f"info: {local_user.pw_name}, postmaster\n"
                       f"staff: {local_user.pw_name}, no-such-user-kt\n"
                       f"archive: {local_user.pw_name}, \"|/usr/bin/logger -t archive\"\n")
    extra = ("mydestination = localhost\n"
             "virtual_mailbox_domains = example.test\n"
             "home_mailbox = Maildir/\n"
             f"alias_maps = texthash:{aliases}\n")
    return relay_factory(extra)


def user_maildir_files(user, sub="new"):
    d = os.path.join(user.pw_dir, "Maildir", sub)
    return sorted(os.path.join(d, f) for f in os.listdir(d)) if os.path.isdir(d) else []


def test_delivery_to_local_user(local_relay, local_user):
    c = SmtpConn(local_relay.port())
    content = b"Subject: to a local user\r\n\r\nhello\r\n"
    queued(send_data(c, content, rcpts=(f"{local_user.pw_name}@localhost",)))
    files = user_maildir_files(local_user)
    assert len(files) == 1
    st = os.stat(files[0])
    assert (st.st_uid, st.st_gid) == (local_user.pw_uid, local_user.pw_gid)
    assert st.st_mode & 0o077 == 0
    for sub in ("", "new", "cur", "tmp"):
        d = os.stat(os.path.join(local_user.pw_dir, "Maildir", sub))
        assert (d.st_uid, d.st_gid) == (local_user.pw_uid, local_user.pw_gid), sub
    received, rest = split_received(Path(files[0]))
    assert rest == content
    assert f"for <{local_user.pw_name}@localhost>;".encode() in received


def test_aliases_reach_the_user_once_per_recipient(local_relay, local_user):
    c = SmtpConn(local_relay.port())
    # root, postmaster and abuse all end at the user; info names the user twice over
    for i, rcpts in enumerate([("postmaster@localhost",), ("abuse@localhost",), ("info@localhost", "root@localhost")]):
        if i == 0:
            queued(send_data(c, f"Subject: alias {i}\r\n\r\n".encode(), rcpts=rcpts))
        else:
            assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
            for r in rcpts:
                assert c.cmd(f"RCPT TO:<{r}>") == "250 2.1.5 Ok"
            qid = queued(send_data_only(c, f"Subject: alias {i}\r\n\r\n".encode()))
    # info@ and root@ are two recipients: a copy each (Delivered-To: info@..., root@...), as Postfix's local(8)
    assert local_relay.wait_log(f"{qid}: removed", timeout=30)
    files = user_maildir_files(local_user)
    assert len(files) == 4
    subjects = sorted(split_received(Path(f))[1] for f in files)
    assert subjects == [f"Subject: alias {i}\r\n\r\n".encode() for i in (0, 1, 2, 2)]


def test_unknown_local_user(local_relay, local_user):
    with smtplib.SMTP("127.0.0.1", local_relay.port(), timeout=20) as s:
        s.ehlo("c.example.org")
        s.mail("s@example.org")
        code, msg = s.rcpt("no-such-user-kt@localhost")
        assert code == 550
        assert msg.startswith(b"5.1.1 <no-such-user-kt@localhost>: Recipient address rejected: "
                              b"User unknown in local recipient table")
        code, msg = s.rcpt(f"{local_user.pw_name}@localhost")
        assert code == 250
    assert local_relay.wait_log("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.1.1 <no-such-user-kt@localhost>")
    assert user_maildir_files(local_user) == []


def test_alias_targets_that_cannot_be_delivered(local_relay, local_user):
    """An alias with a |command target refuses the whole recipient (ktrelay runs no commands, and a copy for
    the user alone would drop the command's part unseen). An alias listing an unknown user delivers to the
    others, as Postfix's local(8) does, and logs the target it left out."""
    c = SmtpConn(local_relay.port())
    assert c.cmd("EHLO c.example.org").startswith("250")
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<archive@localhost>") == \
        "550 5.1.1 <archive@localhost>: Recipient address rejected: unsupported alias target"
    assert c.cmd("RCPT TO:<staff@localhost>") == "250 2.1.5 Ok"
    qid = queued(send_data_only(c, b"Subject: to staff\r\n\r\nhello\r\n"))
    assert local_relay.wait_log(f"warning: {qid}: to=<staff@localhost>: 1 alias target not delivered, the last "
                                f"one no-such-user-kt: unknown local user")
    assert local_relay.wait_log("reject: RCPT from unknown[127.0.0.1]: 550 5.1.1 <archive@localhost>: Recipient "
                                "address rejected: unsupported alias target")
    files = user_maildir_files(local_user)
    assert len(files) == 1
    assert split_received(Path(files[0]))[1] == b"Subject: to staff\r\n\r\nhello\r\n"
