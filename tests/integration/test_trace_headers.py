"""Trace headers of every final delivery, as Postfix's virtual(8) and local(8) prepend them:
Return-Path: (<> for the null sender), X-Original-To: and Delivered-To:, the same whether the message
was delivered straight from the SMTP session (one recipient), through the queue (several recipients, or
one of them relayed) or by the local delivery agent to a system user; and the mail loop check: a message
that already carries Delivered-To: for its recipient is refused (direct: 554 5.4.6 at the end of data) or
bounced with dsn=5.4.6 (queued)."""
import os
import re
import shutil

import pytest

from conftest import SmtpConn, new_system_user, wait_until

BODY = b"From: <s@example.org>\r\nSubject: trace\r\n\r\nhello\r\n"


def send(relay, rcpts, body=BODY, sender="s@example.org", bdat=False):
    c = SmtpConn(relay.port())
    c.ehlo()
    c.cmd(f"MAIL FROM:<{sender}>", 250)
    for r in rcpts:
        c.cmd(f"RCPT TO:<{r}>", 250)
    if bdat:
        c.send(b"BDAT %d LAST\r\n" % len(body) + body)
    else:
        c.cmd("DATA", 354)
        c.send(body + b".\r\n")
    reply = c.reply()
    c.cmd("QUIT", 221)
    return reply


def trace_of(data):
    """The lines before Received:, and the rest after the Received: header."""
    head, rest = data.split(b"Received: ", 1)
    rest = rest[rest.index(b"\r\n") + 2:]
    while rest[:1] in (b"\t", b" "):
        rest = rest[rest.index(b"\r\n") + 2:]
    return head, rest


def expected(sender, rcpt):
    return f"Return-Path: <{sender}>\r\nX-Original-To: {rcpt}\r\nDelivered-To: {rcpt}\r\n".encode()


def files_of(relay, user, n=1):
    return wait_until(lambda: len(relay.maildir_files(f"example.test/{user}/")) >= n and
                      relay.maildir_files(f"example.test/{user}/"), what=f"{n} file(s) for {user}")


@pytest.mark.parametrize("bdat", [False, True], ids=["DATA", "BDAT"])
def test_direct_and_queued_deliveries_carry_the_same_trace(relay, bdat):
    # one recipient: written by the session itself, before the 250
    r = send(relay, ["alice@example.test"], bdat=bdat)
    assert r.startswith("250 2.0.0 Ok: queued as ")
    (direct,) = relay.maildir_files("example.test/alice/")
    head, rest = trace_of(direct.read_bytes())
    assert head == expected("s@example.org", "alice@example.test")
    assert rest == BODY
    # two recipients: a copy each, through the queue, each with its own Delivered-To
    qid = re.search(r"queued as (\w+)", send(relay, ["alice@example.test", "bob@example.test"], bdat=bdat)).group(1)
    assert relay.wait_log(f"{qid}: removed", timeout=20)
    new = [f for f in relay.maildir_files("example.test/alice/") if f != direct]
    (bob,) = files_of(relay, "bob")
    assert len(new) == 1
    for f, rcpt in ((new[0], "alice@example.test"), (bob, "bob@example.test")):
        head, rest = trace_of(f.read_bytes())
        assert head == expected("s@example.org", rcpt)
        assert rest == BODY


def test_null_sender(relay):
    send(relay, ["alice@example.test"], sender="")
    (f,) = relay.maildir_files("example.test/alice/")
    assert f.read_bytes().startswith(b"Return-Path: <>\r\nX-Original-To: alice@example.test\r\n"
                                     b"Delivered-To: alice@example.test\r\nReceived: ")


def test_same_trace_when_another_recipient_is_relayed(relay_factory):
    """A relayed recipient sends the message through the queue: the local copy looks the same as a direct
    one (the relayed recipient is deferred here: its next hop is down)."""
    r = relay_factory("mynetworks = 127.0.0.0/8\nrelayhost = [127.0.0.1]:9\nqueue_run_delay = 1s\n")
    send(r, ["alice@example.test", "far@remote.test"])
    (f,) = files_of(r, "alice")
    head, rest = trace_of(f.read_bytes())
    assert head == expected("s@example.org", "alice@example.test")
    assert rest == BODY


def test_delivered_to_loop_direct_is_refused(relay):
    looped = b"Delivered-To: Alice@Example.test\r\n" + BODY
    assert send(relay, ["alice@example.test"], body=looped) == \
        "554 5.4.6 Error: mail forwarding loop for alice@example.test"
    assert send(relay, ["alice@example.test"], body=looped, bdat=True) == \
        "554 5.4.6 Error: mail forwarding loop for alice@example.test"
    assert relay.maildir_files("example.test/alice/") == []
    assert relay.maildir_files("example.test/alice/", sub="tmp") == []
    assert re.search(r"[0-9A-F]+: reject: mail forwarding loop for alice@example.test from unknown\[127\.0\.0\.1\]; "
                     r"from=<s@example.org> to=<alice@example.test> proto=ESMTP helo=<client.example.net>",
                     relay.log())
    # another recipient's Delivered-To is no loop
    assert send(relay, ["alice@example.test"], body=b"Delivered-To: bob@example.test\r\n" + BODY).startswith("250")


def test_delivered_to_loop_queued_bounces_that_recipient(relay):
    looped = b"Delivered-To: alice@example.test\r\n" + BODY
    qid = re.search(r"queued as (\w+)", send(relay, ["alice@example.test", "bob@example.test"], body=looped,
                                              sender="")).group(1)
    assert relay.wait_log(f"{qid}: to=<alice@example.test>, relay=virtual, delay=", timeout=20)
    assert re.search(rf"{qid}: to=<alice@example.test>, relay=virtual, delay=\d+, dsn=5\.4\.6, status=bounced "
                     r"\(mail forwarding loop for alice@example.test\)", relay.log()), relay.log()[-2000:]
    (bob,) = files_of(relay, "bob")
    assert trace_of(bob.read_bytes())[0] == expected("", "bob@example.test")
    assert relay.maildir_files("example.test/alice/") == []


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                                reason="needs root and useradd to create a real system user")


@pytest.fixture
def system_user(tmp_path):
    with new_system_user(tmp_path, "kttr") as pw:
        yield pw


@needs_root
def test_local_delivery_agent_writes_the_same_trace(relay_factory, system_user):
    r = relay_factory("mydestination = localhost\nvirtual_mailbox_domains = example.test\nhome_mailbox = Maildir/\n")
    rcpt = f"{system_user.pw_name}@localhost"
    new = os.path.join(system_user.pw_dir, "Maildir", "new")

    def files():
        return sorted(os.listdir(new)) if os.path.isdir(new) else []

    send(r, [rcpt])                                  # direct: the agent copies the session's spool
    send(r, [rcpt, "alice@example.test"])            # queued: the queue manager hands it to the agent
    wait_until(lambda: len(files()) == 2, what="two files for the system user")
    for name in files():
        with open(os.path.join(new, name), "rb") as fh:
            head, rest = trace_of(fh.read())
        assert head == expected("s@example.org", rcpt)
        assert rest == BODY
