"""Local delivery to a real system user: mydestination, home_mailbox = Maildir/,
alias_maps with aliases to the user, files owned by the user, and 550 for an
unknown local user. Creates a user with useradd, so it needs root."""
import os
import re
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, SmtpConn, new_system_user
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


def aliased_relay(relay_factory, tmp_path, aliases_text, extra=""):
    """A relay for local users (mydestination = localhost, ~/Maildir/) with its own alias table."""
    aliases = tmp_path / f"aliases-{len(list(tmp_path.glob('aliases-*')))}"
    aliases.write_text(aliases_text)
    return relay_factory(f"mydestination = localhost\nhome_mailbox = Maildir/\nalias_maps = texthash:{aliases}\n"
                         + extra)


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
    # logged once, with the id of the message that was received (none for a recipient later RSET)
    assert local_relay.log().count("alias target not delivered") == 1
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<staff@localhost>") == "250 2.1.5 Ok"
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    assert local_relay.log().count("alias target not delivered") == 1


def test_unlisted_sender_is_about_existence_not_deliverability(relay_factory, local_user, tmp_path):
    """smtpd_reject_unlisted_sender refuses a sender no user, alias or virtual mailbox names. An alias
    ktrelay cannot deliver to (a |command, as mailing list software uses) or whose targets are gone still
    names a sender that exists, as in Postfix."""
    r = aliased_relay(relay_factory, tmp_path,
                      f"lists: {local_user.pw_name}, \"|/usr/bin/true\"\nghosts: no-such-user-kt1\n",
                      "smtpd_reject_unlisted_sender = yes\nunknown_local_recipient_reject_code = 450\n")
    c = SmtpConn(r.port())
    assert c.cmd("EHLO c.example.org").startswith("250")
    for sender in ("lists@localhost", "ghosts@localhost"):
        assert c.cmd(f"MAIL FROM:<{sender}>") == "250 2.1.0 Ok"
        assert c.cmd(f"RCPT TO:<{local_user.pw_name}@localhost>") == "250 2.1.5 Ok", sender
        assert c.cmd("RSET") == "250 2.0.0 Ok"
    # an alias that reaches nobody is refused as a recipient with 550 whatever the unknown-user code: it
    # is listed, so a retry cannot help
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<ghosts@localhost>") == \
        "550 5.1.1 <ghosts@localhost>: Recipient address rejected: User unknown in local recipient table"


def write_forward(user, text):
    """~/.forward owned by the user, as a user writes it."""
    path = Path(user.pw_dir) / ".forward"
    path.write_text(text)
    os.chown(path, user.pw_uid, user.pw_gid)
    return path


def test_a_user_with_a_forward_file_is_deferred_until_it_names_no_address(local_relay, local_user):
    """Postfix's local(8) delivers through ~/.forward (forward_path's default); ktrelay does not forward
    through it, and the user's Maildir is not where that user reads mail: the mail is deferred, with the
    reason logged, not put in the Maildir. Straight from the session that is a 451 (the client keeps it);
    through the queue it waits there, and goes into the Maildir once the file names no address."""
    forward = write_forward(local_user, "someone@example.org\n")
    user = f"{local_user.pw_name}@localhost"
    c = SmtpConn(local_relay.port())
    assert c.cmd("EHLO c.example.org").startswith("250")
    start = send_data(c, b"Subject: direct\r\n\r\nhello\r\n", rcpts=(user,))
    assert start == "451 4.3.0 Error: queue file write error", start
    reason = (f"{local_user.pw_dir}/.forward exists: ktrelay does not deliver through .forward files "
              f"(forward_path); the mail is deferred until it is removed")
    assert local_relay.wait_log(f"warning: delivery deferred: {reason}")
    # two recipients: through the queue (a copy each), where the user's copy waits
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    qid = queued(send_data(c, b"Subject: queued\r\n\r\nhello\r\n", rcpts=(user, "root@localhost")))
    assert local_relay.wait_log(f"{qid}: to=<{user}>", timeout=30)
    assert re.search(rf"{qid}: to=<{re.escape(user)}>.*status=deferred \({re.escape(reason)}\)",
                     local_relay.log()), local_relay.log()[-2000:]
    assert user_maildir_files(local_user) == []
    forward.write_text("# nothing\n\n  \n")   # blank and comment lines forward nowhere: as no file
    assert subprocess.run([BIN, "queue", "flush", "-c", str(local_relay.dir)], capture_output=True).returncode == 0
    assert local_relay.wait_log(f"{qid}: removed", timeout=30), local_relay.log()[-2000:]
    # root's copy goes to the same user (root: user), after the .forward is gone, so two
    files = user_maildir_files(local_user)
    assert len(files) == 2
    assert all(split_received(Path(f))[1] == b"Subject: queued\r\n\r\nhello\r\n" for f in files)


@pytest.mark.parametrize("kind", ["symlink", "directory", "world-writable", "other owner"])
def test_a_forward_file_local8_would_pass_over_does_not_hold_mail(local_relay, local_user, kind):
    """Postfix's local(8) forwards only through a regular .forward (no link followed), owned by the user or
    root and not writable by others; any other is passed over, and mail goes to the mailbox. So here."""
    path = Path(local_user.pw_dir) / ".forward"
    if kind == "symlink":
        target = Path(local_user.pw_dir) / "fwd"
        target.write_text("someone@example.org\n")
        os.chown(target, local_user.pw_uid, local_user.pw_gid)
        path.symlink_to(target)
    elif kind == "directory":
        path.mkdir()
    else:
        write_forward(local_user, "someone@example.org\n")
        if kind == "world-writable":
            path.chmod(0o666)
        else:
            os.chown(path, 65534, 65534)
    c = SmtpConn(local_relay.port())
    queued(send_data(c, b"Subject: direct\r\n\r\nhello\r\n", rcpts=(f"{local_user.pw_name}@localhost",)))
    assert len(user_maildir_files(local_user)) == 1


def test_one_members_forward_file_does_not_hold_up_an_alias(relay_factory, local_user, tmp_path):
    """An alias of two users, one of whom has a .forward: the message is not held for everyone until that
    member removes it. Both copies go to the Maildirs, and the passed-over .forward is logged."""
    with new_system_user(tmp_path, "kttb") as other:
        write_forward(other, "someone@example.org\n")
        r = aliased_relay(relay_factory, tmp_path, f"team: {local_user.pw_name}, {other.pw_name}\n")
        c = SmtpConn(r.port())
        queued(send_data(c, b"Subject: team\r\n\r\nhello\r\n", rcpts=("team@localhost",)))
        assert len(user_maildir_files(local_user)) == 1
        assert len(user_maildir_files(other)) == 1
        assert r.wait_log(f"warning: {other.pw_dir}/.forward exists: ktrelay does not deliver through .forward "
                          f"files (forward_path); this copy, one of an alias's, goes to {other.pw_dir}/Maildir/")
        # mail for that member alone still waits
        assert send_data(c, b"Subject: alone\r\n\r\nhello\r\n", rcpts=(f"{other.pw_name}@localhost",)) == \
            "451 4.3.0 Error: queue file write error"
        assert len(user_maildir_files(other)) == 1


def test_forward_path_empty_delivers_whatever_forward_files_exist(relay_factory, local_user):
    """forward_path = (empty): Postfix reads no .forward file, so neither does the check."""
    write_forward(local_user, "someone@example.org\n")
    r = relay_factory("mydestination = localhost\nhome_mailbox = Maildir/\nforward_path =\n")
    c = SmtpConn(r.port())
    queued(send_data(c, b"Subject: direct\r\n\r\nhello\r\n", rcpts=(f"{local_user.pw_name}@localhost",)))
    assert len(user_maildir_files(local_user)) == 1


def test_unknown_local_recipient_reject_code(relay_factory, local_user, tmp_path):
    """unknown_local_recipient_reject_code = 450, as operators set it while moving users: an unknown local
    recipient (and, with smtpd_reject_unlisted_sender, an unknown local sender) is refused for now, so the
    client tries again later; known users are unaffected. An alias is listed even when it reaches nobody, and
    so is ghosts+x (local(8) looks up the unextended name): 550, and a valid sender. A value that is not a
    4xx or 5xx code is refused."""
    r = aliased_relay(relay_factory, tmp_path, "ghosts: no-such-user-kt1\n",
                      "recipient_delimiter = +\nunknown_local_recipient_reject_code = 450\n"
                      "smtpd_reject_unlisted_sender = yes\n")
    c = SmtpConn(r.port())
    assert c.cmd("EHLO c.example.org").startswith("250")
    assert c.cmd("MAIL FROM:<ghosts+x@localhost>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<ghosts+x@localhost>") == \
        "550 5.1.1 <ghosts+x@localhost>: Recipient address rejected: User unknown in local recipient table"
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<no-such-user-kt@localhost>") == \
        "450 4.1.1 <no-such-user-kt@localhost>: Recipient address rejected: User unknown in local recipient table"
    assert c.cmd(f"RCPT TO:<{local_user.pw_name}@localhost>") == "250 2.1.5 Ok"
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    assert c.cmd("MAIL FROM:<no-such-user-kt@localhost>") == "250 2.1.0 Ok"
    assert c.cmd(f"RCPT TO:<{local_user.pw_name}@localhost>") == \
        "450 4.1.0 <no-such-user-kt@localhost>: Sender address rejected: User unknown in local recipient table"
    d = tmp_path / "bad"
    d.mkdir()
    (d / "main.cf").write_text(f"queue_directory = {d}/q\ndata_directory = {d}/d\n"
                               "unknown_local_recipient_reject_code = 250\n")
    p = subprocess.run([BIN, "check-config", "-c", str(d)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 78 and ("bad value 250 for unknown_local_recipient_reject_code: expected a 4xx or 5xx "
                                   "reply code") in p.stderr, p.stderr


def test_an_alias_with_remote_targets_is_refused_not_cut(relay_factory, local_user, tmp_path):
    """Postfix's local(8) forwards a local alias's remote targets; ktrelay does not (virtual_alias_maps
    does). An alias with a remote target is refused whole, from SMTP and from sendmail (a bounce), rather
    than delivered to its local part with the rest dropped unseen."""
    r = aliased_relay(relay_factory, tmp_path, f"team: {local_user.pw_name}, someone@remote.example\n")
    c = SmtpConn(r.port())
    assert c.cmd("EHLO c.example.org").startswith("250")
    assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<team@localhost>") == ("550 5.1.1 <team@localhost>: Recipient address rejected: alias "
                                                 "forwards to remote addresses, which this server does not relay")
    p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), "-f", "alice@example.test", "team@localhost"],
                       input=b"Subject: team\n\nhello\n", capture_output=True)
    assert p.returncode == 0, p.stderr
    assert r.wait_log(r"to=<team@localhost>, relay=local, ", timeout=30), r.log()[-2000:]
    assert re.search(r"to=<team@localhost>, relay=local, .*dsn=5\.0\.0, status=bounced \(alias forwards to remote "
                     r"addresses, which this server does not relay\)", r.log()), r.log()[-2000:]
    assert user_maildir_files(local_user) == []


def test_a_forward_file_that_names_only_its_user_is_as_none(local_relay, local_user):
    """local(8): "user" or "\\user" in the user's own .forward means the user's mailbox, and "(...)" is a
    comment: such a file forwards nowhere else, so mail goes to the Maildir."""
    name = local_user.pw_name
    write_forward(local_user, f"\\{name}, (keep a copy)\n# a comment\n  {name}\n,,,\n")
    c = SmtpConn(local_relay.port())
    queued(send_data(c, b"Subject: self\r\n\r\nhello\r\n", rcpts=(f"{name}@localhost",)))
    assert len(user_maildir_files(local_user)) == 1
    write_forward(local_user, f"\\{name}, elsewhere@example.org\n")
    assert send_data(c, b"Subject: copy and forward\r\n\r\nhello\r\n", rcpts=(f"{name}@localhost",)) == \
        "451 4.3.0 Error: queue file write error"


def test_a_forward_file_does_not_hold_up_a_virtual_member_of_an_alias(relay_factory, local_user, tmp_path):
    """team: a system user who has a .forward, and a virtual mailbox: the virtual member's copy is not held."""
    write_forward(local_user, "someone@example.org\n")
    r = aliased_relay(relay_factory, tmp_path, f"team: {local_user.pw_name}, alice@example.test\n",
                      "virtual_mailbox_domains = example.test\n")
    c = SmtpConn(r.port())
    queued(send_data(c, b"Subject: team\r\n\r\nhello\r\n", rcpts=("team@localhost",)))
    assert len(user_maildir_files(local_user)) == 1
    assert len(r.maildir_files("example.test/alice/")) == 1


def test_an_alias_note_goes_with_a_recipient_a_milter_refuses(relay_factory, local_user, tmp_path):
    """A milter's refusal of a recipient takes back what that RCPT added, its alias note too."""
    from test_milter import PyMilter
    m = PyMilter(tmp_path, "reject-rcpt", False)
    try:
        r = aliased_relay(relay_factory, tmp_path, f"badlist: {local_user.pw_name}, no-such-user-kt\n",
                          f"smtpd_milters = {m.spec}\n")
        c = SmtpConn(r.port())
        assert c.cmd("EHLO c.example.org").startswith("250")
        assert c.cmd("MAIL FROM:<s@example.org>") == "250 2.1.0 Ok"
        assert c.cmd("RCPT TO:<badlist@localhost>") == "550 5.1.1 no such user here"
        assert c.cmd(f"RCPT TO:<{local_user.pw_name}@localhost>") == "250 2.1.5 Ok"
        qid = queued(send_data_only(c, b"Subject: one\r\n\r\nhello\r\n"))
        assert r.wait_log(f"{qid}: ") and "alias target not delivered" not in r.log(), r.log()[-2000:]
        assert len(user_maildir_files(local_user)) == 1
    finally:
        m.stop()


def test_an_alias_that_reaches_nobody_bounces_with_its_replys_code(relay_factory, tmp_path):
    """From sendmail an alias of unknown users bounces with the enhanced code of its reply (5.1.1), not
    the default 5.0.0."""
    r = aliased_relay(relay_factory, tmp_path, "ghosts: no-such-user-kt1\n")
    p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), "-f", "alice@example.test", "ghosts@localhost"],
                       input=b"Subject: ghosts\n\nhello\n", capture_output=True)
    assert p.returncode == 0, p.stderr
    assert r.wait_log("to=<ghosts@localhost>, relay=local, ", timeout=30), r.log()[-2000:]
    assert re.search(r"to=<ghosts@localhost>, relay=local, .*dsn=5\.1\.1, status=bounced", r.log()), r.log()[-2000:]
