"""Address completion as Postfix's trivial-rewrite does it (append_at_myorigin, append_dot_mydomain),
<postmaster> as RFC 5321 and Postfix accept it, and local delivery that never creates a home
directory. The base configuration is a virtual-only MX (`mydestination =`) whose test client is not in
mynetworks: a bare <root> or <daemon> is root@$myorigin, a remote address, and refused."""
import os
import pwd
import socket

import pytest

from conftest import SmtpConn


def session(relay):
    c = SmtpConn(sock=socket.create_connection(("127.0.0.1", relay.port()), timeout=10))
    assert c.cmd("EHLO client.test").startswith("250")
    return c


@pytest.mark.parametrize("user", ["root", "daemon", "www-data", "nobody", "Root"])
def test_bare_system_account_is_remote(relay, user):
    c = session(relay)
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    # Postfix's reply names the address as the client gave it
    assert c.cmd(f"RCPT TO:<{user}>") == f"554 5.7.1 <{user}>: Relay access denied"
    assert c.cmd("VRFY root") == "554 5.7.1 <root>: Relay access denied"
    c.close()
    assert relay.wait_log(f"NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 <{user}>: Relay access denied")


def test_postmaster_and_sender_completion(relay_factory):
    r = relay_factory("myorigin = localhost\n")
    c = session(r)
    assert c.cmd("MAIL FROM:<bob>") == "250 2.1.0 Ok"
    # <postmaster> without a domain is accepted whatever the restrictions, and completed
    assert c.cmd("RCPT TO:<postmaster>") == "250 2.1.5 Ok"
    assert c.cmd("RCPT TO:<PostMaster>") == "250 2.1.5 Ok"
    # abuse has no such exemption: it is completed like any other local part (abuse@localhost: catch-all)
    assert c.cmd("RCPT TO:<abuse>") == "250 2.1.5 Ok"
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: pm\r\n\r\nhi\r\n.\r\n")
    qid = c.reply().removeprefix("250 2.0.0 Ok: queued as ")
    # two recipients: delivered through the queue, a copy each
    assert r.wait_log(f"{qid}: removed", timeout=30), r.log()[-3000:]
    c.close()
    assert len(r.maildir_files("localhost/postmaster/")) == 1
    assert len(r.maildir_files("localhost/catchall/")) == 1
    assert r.wait_log("from=<bob@localhost>, size=")
    # with append_at_myorigin = no a bare local part stays local-only: no local domain, refused
    r2 = relay_factory("append_at_myorigin = no\nmydestination = localhost\nmyorigin = localhost\n"
                       "virtual_mailbox_domains = example.test\n")
    c = session(r2)
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<nosuchuser-kt>") == \
        "550 5.1.1 <nosuchuser-kt>: Recipient address rejected: User unknown in local recipient table"
    c.close()


def test_append_dot_mydomain(relay_factory):
    r = relay_factory("append_dot_mydomain = yes\nmydomain = test\n")
    c = session(r)
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<alice@example>") == "250 2.1.5 Ok"     # alice@example.test
    assert c.cmd("RCPT TO:<x@[127.0.0.1]>").startswith("554 5.7.1")  # literals are left alone
    c.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="the case that matters runs as root")
def test_missing_home_is_never_created(relay_factory):
    try:
        u = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no nobody user")
    if os.path.exists(u.pw_dir):
        pytest.skip(f"{u.pw_dir} exists here")
    r = relay_factory("mydestination = localhost\nvirtual_mailbox_domains = example.test\nalias_maps =\n")
    c = session(r)
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<nobody@localhost>") == "250 2.1.5 Ok"
    # the delivery fails (at DATA, or at the end of data when the local delivery agent writes the copy):
    # a temporary error, the client keeps the message
    rep = c.cmd("DATA")
    if rep.startswith("354"):
        c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        rep = c.reply()
    assert rep.startswith("4") and " 4." in rep, rep
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    c.close()
    assert not os.path.exists(u.pw_dir)


@pytest.mark.parametrize("value,ok", [
    ("proxy:unix:passwd.byname $alias_maps", True),
    ("unix:passwd.byname", True),
    ("", False),
    ("hash:/etc/postfix/local", False),
])
def test_local_recipient_maps_values(tmp_path, value, ok):
    import subprocess
    from conftest import BASE_MAIN_CF, BASE_VMAILBOX, BIN
    (tmp_path / "vmailbox").write_text(BASE_VMAILBOX)
    (tmp_path / "main.cf").write_text(BASE_MAIN_CF.format(dir=tmp_path) + f"local_recipient_maps = {value}\n")
    (tmp_path / "master.cf").write_text("127.0.0.1:1 inet n - n - - smtpd\n")
    p = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True)
    assert (p.returncode == 0) == ok, p.stdout + p.stderr
    if not ok:
        assert "local_recipient_maps" in p.stdout + p.stderr


def test_kill_9_leaves_nothing_and_stale_tmp_files_are_cleaned(tmp_path):
    """kill -9 in the middle of a body leaves nothing: the spool file in the Maildir's tmp/ has no name
    (O_TMPFILE) until it is complete. Named spool files (left by a file system without O_TMPFILE, or by
    earlier versions) are cleaned at the next start: a file of ktrelay's that is older than 36 hours goes,
    younger ones and foreign files stay."""
    import signal
    import time
    from conftest import BASE_MAIN_CF, BASE_VMAILBOX, Relay
    d = tmp_path / "k9"
    d.mkdir()
    from conftest import make_searchable
    make_searchable(d)
    (d / "vmailbox").write_text(BASE_VMAILBOX)
    main_cf = BASE_MAIN_CF.format(dir=d)
    r = Relay(d, main_cf, {"smtp": {}})
    c = session(r)
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<x@localhost>") == "250 2.1.5 Ok"
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: cut\r\n\r\n" + b"z" * 300000)
    tmpdir = r.maildir_base / "localhost/catchall/tmp"
    deadline = time.time() + 10
    while not r.open_spool_files():
        assert time.time() < deadline
        time.sleep(0.05)
    r.stop(sig=signal.SIGKILL)
    c.close()
    assert list(tmpdir.iterdir()) == []
    assert r.maildir_files() == []                      # nothing half-written in new/
    old = time.time() - 37 * 3600
    stale = tmpdir / "1700000000.M0P1Q0x1.mx.example.test"
    stale.write_bytes(b"stale")
    os.utime(stale, (old, old))
    young = tmpdir / "1700000000.M1P1Q0x1.mx.example.test"
    young.write_bytes(b"young")
    foreign = tmpdir / "1700000000.M2P2.otherhost"
    foreign.write_bytes(b"not ours")
    os.utime(foreign, (old, old))
    r.logfile.close()
    r2 = Relay(r.dir, main_cf, {"smtp": {}})
    try:
        assert r2.wait_log("removed 1 stale files (older than 36 hours) from Maildir tmp/ folders")
        assert sorted(p.name for p in tmpdir.iterdir()) == sorted([young.name, foreign.name])
    finally:
        assert r2.stop() == 0
