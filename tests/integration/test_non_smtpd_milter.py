"""non_smtpd_milters: mail from `ktrelay sendmail` (root's and a local user's, both through maildrop/ and
the daemon's pickup) goes through the milters with Postfix's non-SMTP conversation (cleanup_milter.c):
connect from localhost[127.0.0.1], EHLO localhost, MAIL and RCPT with the bare addresses, the message
without our own Received:, the end of message; the milters' changes are what gets queued, a 5xx returns
the message to its sender, a 4xx (or a milter down under milter_default_action = tempfail) keeps the drop
file until the milter answers. Real filters: python3-milter (milters/actions.py) and opendkim."""
import os
import re
import shutil
import subprocess

import pytest

import test_milter
import test_ops_sendmail
from conftest import BIN, free_port, wait_until
from test_milter import OpenDkim, milter  # noqa: F401 (a fixture)
from test_ops_sendmail import user, world  # noqa: F401 (fixtures)

MSG = (b"From: alice@example.test\nTo: bob@example.test\nSubject: local\nMessage-ID: <local1@example.test>\n"
       b"\nbody line\n")
# as queued: CRLF, nothing added (it has From:, Message-ID:; Date: is added by sendmail)


def sendmail(relay, *args, msg=MSG, sender="alice@example.test"):
    p = subprocess.run([BIN, "sendmail", "-c", str(relay.dir), "-f", sender, *args], input=msg,
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p


def drops(relay):
    d = relay.dir / "queue" / "maildrop"
    return sorted(x for x in d.iterdir() if not x.name.startswith(".")) if d.exists() else []


def without_trace(data):
    """The message after the final delivery's trace headers and our Received: (folded)."""
    data = re.sub(rb"\A(?:(?:Return-Path|Delivered-To|X-Original-To): [^\r]*\r\n)*", b"", data)
    m = re.match(rb"Received: by mx\.example\.test \(ktrelay, from userid \d+\)\r\n\tid [0-9A-F]+; [^\r]*\r\n", data)
    assert m, data[:300]
    return data[m.end():]


def without_date(rest):
    return re.sub(rb"Date: [^\r]*\r\n", b"", rest)


def pickup_id(relay):
    m = re.search(r"ktrelay/pickup\[\d+\]: ([0-9A-F]+): uid=\d+ from=<", relay.log())
    return m and m.group(1)


def test_events_and_macros_as_postfix_cleanup_sends_them(relay_factory, milter):
    m = milter("continue")
    r = relay_factory(f"non_smtpd_milters = {m.spec}\n")
    sendmail(r, "bob@example.test")
    wait_until(lambda: r.maildir_files("example.test/bob/"), 15, "delivery to bob")
    qid = pickup_id(r)
    assert qid
    rest = without_date(without_trace(r.maildir_files("example.test/bob/")[0].read_bytes()))
    assert rest == MSG.replace(b"\n", b"\r\n")
    assert drops(r) == []
    conn = m.events("connect")[0]
    assert conn["hostname"] == "localhost" and conn["addr"] == "127.0.0.1"
    assert conn["macros"] == {"j": "mx.example.test", "_": "localhost [127.0.0.1]",
                              "{daemon_name}": "mx.example.test", "v": conn["macros"]["v"]}
    assert conn["macros"]["v"].startswith("ktrelay ")
    assert m.events("helo")[0] == {"event": "helo", "name": "localhost", "macros": {}}
    mail = m.events("mail")[0]
    # the bare address, as Postfix's cleanup_milter_emul_mail sends it
    assert mail["sender"] == "alice@example.test"
    assert mail["macros"] == {"i": qid, "{mail_addr}": "alice@example.test"}
    rcpt = m.events("rcpt")[0]
    assert rcpt["rcpt"] == "bob@example.test" and rcpt["macros"] == {"i": qid, "{rcpt_addr}": "bob@example.test"}
    hdrs = m.events("eoh")[0]["headers"]
    assert [h[0] for h in hdrs] == ["From", "To", "Subject", "Message-ID", "Date"]   # not our Received:
    assert m.events("eom")[0]["macros"] == {"i": qid}


def test_smtpd_milters_do_not_see_local_mail_and_non_smtpd_milters_not_smtp(relay_factory, milter):
    local, smtp = milter("continue"), milter("continue")
    r = relay_factory(f"non_smtpd_milters = {local.spec}\nsmtpd_milters = {smtp.spec}\n",
                      services={"smtp": {"non_smtpd_milters": "inet:127.0.0.1:1"}})
    sendmail(r, "bob@example.test")
    wait_until(lambda: r.maildir_files("example.test/bob/"), 15, "delivery to bob")
    test_milter.send(r.port())
    assert len(local.events("eom")) == 1 and len(smtp.events("eom")) == 1
    assert smtp.events("connect")[0]["hostname"] == "[127.0.0.1]"


def test_changes_are_what_is_queued(relay_factory, milter):
    m = milter("edit-all")
    r = relay_factory(f"non_smtpd_milters = {m.spec}\n")
    sendmail(r, "alice@example.test")
    for box in ("alice", "bob"):
        wait_until(lambda: r.maildir_files(f"example.test/{box}/"), 15, f"delivery to {box}")
        data = r.maildir_files(f"example.test/{box}/")[0].read_bytes()
        assert data.startswith(b"Return-Path: <changed@example.test>\r\n"), data[:200]
        rest = without_date(without_trace(data))
        assert rest == (b"From: alice@example.test\r\nTo: bob@example.test\r\nSubject: local\r\n"
                        b"Message-ID: <local1@example.test>\r\nX-Local-Filter: seen\r\n\r\nreplaced body\r\n")
    qid = pickup_id(r)
    assert r.wait_log(f"{qid}: from=<changed@example.test>, size=")
    assert drops(r) == []


def test_reject_returns_the_message_to_its_sender(relay_factory, milter):
    m = milter("reject")
    r = relay_factory(f"non_smtpd_milters = {m.spec}\n")
    sendmail(r, "bob@example.test")
    wait_until(lambda: r.maildir_files("example.test/alice/"), 15, "the bounce to alice")
    qid = pickup_id(r)
    assert re.search(rf"{qid}: milter-reject: END-OF-MESSAGE from localhost\[127\.0\.0\.1\]: 550 5\.7\.1 Command "
                     rf"rejected; from=<alice@example\.test> to=<bob@example\.test>", r.log()), r.log()[-2000:]
    bounce = r.maildir_files("example.test/alice/")[0].read_bytes()
    assert b"Return-Path: <>\r\n" in bounce
    assert b"Subject: Undelivered Mail Returned to Sender\r\n" in bounce
    assert (b"Final-Recipient: rfc822; bob@example.test\r\nOriginal-Recipient: rfc822;bob@example.test\r\n"
            b"Action: failed\r\nStatus: 5.7.1\r\n") in bounce
    assert b"Diagnostic-Code: X-Ktrelay; 550 5.7.1 Command rejected\r\n" in bounce
    assert b"Subject: local\r\n" in bounce and b"\r\n\r\nbody line\r\n" in bounce
    assert r.maildir_files("example.test/bob/") == []
    assert drops(r) == []


def test_discard_drops_it_with_a_log_line(relay_factory, milter):
    m = milter("discard")
    r = relay_factory(f"non_smtpd_milters = {m.spec}\n")
    sendmail(r, "bob@example.test")
    assert r.wait_log("milter-discard: END-OF-MESSAGE from localhost[127.0.0.1]: milter triggers DISCARD action; "
                      "from=<alice@example.test> to=<bob@example.test>", 15)
    wait_until(lambda: drops(r) == [], 10, "the drop file to go")
    assert r.maildir_files("example.test/bob/") == [] and r.maildir_files("example.test/alice/") == []


def test_quarantine_queues_it_on_hold(relay_factory, milter):
    m = milter("quarantine")
    r = relay_factory(f"non_smtpd_milters = {m.spec}\n")
    sendmail(r, "bob@example.test")
    assert r.wait_log("milter-hold: END-OF-MESSAGE from localhost[127.0.0.1]: held by test;", 15)
    qid = pickup_id(r)
    held = r.dir / "queue" / "hold" / qid
    wait_until(held.exists, 10, "hold/ID")
    assert held.read_bytes().endswith(b"\r\n\r\nbody line\r\n")
    # the drop file goes right after hold/ID is durable
    wait_until(lambda: drops(r) == [], 10, "the drop file to go")
    assert r.maildir_files("example.test/bob/") == []
    listing = subprocess.run([BIN, "queue", "-c", str(r.dir), "list"], capture_output=True, text=True, timeout=30)
    assert re.search(rf"^{qid}!", listing.stdout, re.M), listing.stdout


def test_tempfail_keeps_the_drop_file_until_the_milter_answers(relay_factory, milter):
    m = milter("tempfail")
    r = relay_factory(f"non_smtpd_milters = {m.spec}\nqueue_run_delay = 1s\n")
    sendmail(r, "bob@example.test")
    assert r.wait_log("milter-reject: END-OF-MESSAGE from localhost[127.0.0.1]: 451 4.7.1 Service unavailable - "
                      "try again later; from=<alice@example.test> to=<bob@example.test>", 15)
    # tried again after queue_run_delay, the file still there
    assert r.wait_log("milter-reject: END-OF-MESSAGE", 10, count=2)
    assert len(drops(r)) == 1
    assert r.maildir_files("example.test/bob/") == [] and r.maildir_files("example.test/alice/") == []


def test_milter_down_tempfail_then_delivered_once_it_is_back(relay_factory, milter, monkeypatch):
    port = free_port()
    r = relay_factory(f"non_smtpd_milters = inet:127.0.0.1:{port}\nqueue_run_delay = 1s\n")
    sendmail(r, "bob@example.test")
    assert r.wait_log(f"warning: milter inet:127.0.0.1:{port}: connect: Connection refused", 15)
    assert r.wait_log("milter-reject: CONNECT from localhost[127.0.0.1]: 451 4.7.1 Service unavailable - try "
                      "again later;", 10)
    assert len(drops(r)) == 1 and r.maildir_files("example.test/bob/") == []
    monkeypatch.setattr(test_milter, "free_port", lambda: port)
    m = milter("addheader")
    wait_until(lambda: r.maildir_files("example.test/bob/"), 20, "delivery once the milter is back")
    assert b"\r\nX-Filter: one\r\n" in r.maildir_files("example.test/bob/")[0].read_bytes()
    assert drops(r) == [] and len(m.events("eom")) == 1


@pytest.mark.parametrize("action,delivered,held", [("accept", 1, 0), ("quarantine", 0, 1)])
def test_milter_down_default_action(relay_factory, action, delivered, held):
    port = free_port()
    r = relay_factory(f"non_smtpd_milters = inet:127.0.0.1:{port}\nmilter_default_action = {action}\n")
    sendmail(r, "bob@example.test")
    if delivered:
        wait_until(lambda: r.maildir_files("example.test/bob/"), 15, "delivery")
        rest = without_date(without_trace(r.maildir_files("example.test/bob/")[0].read_bytes()))
        assert rest == MSG.replace(b"\n", b"\r\n")
    else:
        wait_until(lambda: list((r.dir / "queue" / "hold").iterdir()), 15, "a held message")
        assert r.maildir_files("example.test/bob/") == []
    assert len(list((r.dir / "queue" / "hold").iterdir())) == held
    wait_until(lambda: drops(r) == [], 10, "the drop file to go")


def verify_stored(verifier, tmp_path, data):
    """opendkim -t, with the verifier's configuration, accepts the stored file's signature."""
    copy = tmp_path / "stored.eml"
    copy.write_bytes(data)
    chk = subprocess.run(["opendkim", "-x", str(verifier.conf), "-t", str(copy)], capture_output=True, text=True,
                         timeout=30)
    assert chk.returncode == 0, chk.stderr
    assert "verification (s=test, d=example.org, 2048-bit key) succeeded" in chk.stdout + chk.stderr


@pytest.mark.skipif(shutil.which("opendkim") is None, reason="opendkim is not installed")
def test_opendkim_signs_local_mail(relay_factory, tmp_path):
    signer = OpenDkim(tmp_path, "s")
    verifier = OpenDkim(tmp_path, "v")
    try:
        r = relay_factory(f"non_smtpd_milters = {signer.spec}, {verifier.spec}\n")
        msg = (b"From: Alice <alice@example.org>\nTo: bob@example.test\nSubject: signed locally\n"
               b"Date: Mon, 30 Nov 2026 10:00:00 +0000\nMessage-ID: <dkim-local@example.org>\n\n"
               b"line one\n.leading dot\n\nlast line\n")
        sendmail(r, "bob@example.test", msg=msg, sender="alice@example.org")
        wait_until(lambda: r.maildir_files("example.test/bob/"), 15, "delivery")
        data = r.maildir_files("example.test/bob/")[0].read_bytes()
        assert re.search(rb"\r\nDKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=example.org; s=test;", data)
        assert re.search(rb"Authentication-Results: verifier.example.test;\r\n\tdkim=pass ", data), data[:1200]
        assert data.endswith(b"\r\n\r\nline one\r\n.leading dot\r\n\r\nlast line\r\n")
        verify_stored(verifier, tmp_path, data)
    finally:
        signer.stop()
        verifier.stop()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"), reason="needs root and useradd")
def test_local_user_through_maildrop_gets_the_milters_changes(world, user, milter):
    m = milter("addheader")
    r = test_ops_sendmail.start(world, f"non_smtpd_milters = {m.spec}\n")
    try:
        env = {"PATH": "/usr/bin:/bin", "KTRELAY_CONFIG": str(r.dir), "HOME": "/", "LOGNAME": user.pw_name}
        p = test_ops_sendmail.as_user(user, [BIN, "sendmail", "-i", "bob@example.test"],
                                      b"Subject: from a user\nX-Remove: x\n\nhello\n", env)
        assert p.returncode == 0 and p.stderr == b"", p.stderr
        wait_until(lambda: test_ops_sendmail.maildir(r, "bob"), 20, "delivery to bob")
        data = test_ops_sendmail.maildir(r, "bob")[0].read_bytes()
        head = data.split(b"\r\n\r\n", 1)[0]
        # X-First at index 0 precedes our Received: (as in Postfix), which names the submitting user
        assert re.search(rb"Delivered-To: bob@example.test\r\nX-First: zero\r\nReceived: by mx.example.test "
                         rb"\(ktrelay, from userid " + str(user.pw_uid).encode() + rb"\)\r\n", head), head
        assert b"\r\nSubject: changed subject\r\n" in head and b"X-Remove" not in head
        assert head.endswith(b"\r\nX-Filter: one") and data.endswith(b"\r\n\r\nhello\r\n")
        mail = m.events("mail")[0]
        assert mail["sender"] == f"{user.pw_name}@origin.example"
        assert not list((world / "queue" / "maildrop").iterdir())
    finally:
        r.stop()


def test_receive_override_no_milters_in_main_cf_turns_them_off(relay_factory, milter):
    m = milter("addheader")
    r = relay_factory(f"non_smtpd_milters = {m.spec}\nreceive_override_options = no_milters\n")
    sendmail(r, "bob@example.test")
    wait_until(lambda: r.maildir_files("example.test/bob/"), 15, "delivery to bob")
    assert b"X-Filter" not in r.maildir_files("example.test/bob/")[0].read_bytes()
    assert m.events() == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd") or shutil.which("opendkim") is None,
                    reason="needs root, useradd and opendkim")
def test_local_user_mail_is_signed_by_opendkim(world, user, tmp_path):
    signer = OpenDkim(tmp_path, "s")
    r = test_ops_sendmail.start(world, f"non_smtpd_milters = {signer.spec}\n")
    try:
        env = {"PATH": "/usr/bin:/bin", "KTRELAY_CONFIG": str(r.dir), "HOME": "/", "LOGNAME": user.pw_name}
        msg = (b"From: Alice <alice@example.org>\nTo: bob@example.test\nSubject: signed for a user\n"
               b"Date: Mon, 30 Nov 2026 10:00:00 +0000\nMessage-ID: <dkim-user@example.org>\n\nhello\n")
        p = test_ops_sendmail.as_user(user, [BIN, "sendmail", "-i", "-f", "alice@example.org", "bob@example.test"],
                                      msg, env)
        assert p.returncode == 0 and p.stderr == b"", p.stderr
        wait_until(lambda: test_ops_sendmail.maildir(r, "bob"), 20, "delivery to bob")
        data = test_ops_sendmail.maildir(r, "bob")[0].read_bytes()
        assert re.search(rb"\r\nDKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=example.org; s=test;", data)
        # a second opendkim, in verify mode, checks the stored file
        verifier = OpenDkim(tmp_path, "v")
        verifier.stop()
        verify_stored(verifier, tmp_path, data)
    finally:
        r.stop()
        signer.stop()
