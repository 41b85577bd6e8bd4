"""virtual_alias_maps and virtual_alias_domains (Postfix's virtual(5) aliasing, done by cleanup before a
message is queued), recipient_delimiter and propagate_unmatched_extensions: one-to-many expansion,
recursion, an address that expands to itself, a loop, the expansion limit, unknown users of an alias
domain, user+tag, remote alias targets through the queue. Real sessions, real Maildirs, smtp-sink as
the next hop."""
import os
import re

import pytest

from conftest import BIN as BIN_, SmtpConn, wait_until
from test_ops_sendmail import user, world  # noqa: F401 (fixtures)

VALIAS = """\
team@alias.test      alice@example.test, bob@example.test
deep@alias.test      mid@alias.test
mid@alias.test       bob@example.test
keep@example.test    keep@example.test, alice@example.test
loop1@alias.test     loop2@alias.test
loop2@alias.test     loop1@alias.test
carol@alias.test     alice@example.test
big@alias.test       alice@example.test, bob@example.test, keep@example.test, dave@example.test
far@alias.test       someone@remote.test, alice@example.test
ghost@alias.test     nobody@example.test
"""

VMAILBOX_EXTRA = "keep@example.test    example.test/keep/\ndave@example.test    example.test/dave/\n"

EXTRA = """\
virtual_alias_domains = alias.test
virtual_alias_maps = texthash:{dir}/valias
recipient_delimiter = +
virtual_alias_expansion_limit = 4
minimal_backoff_time = 1s
maximal_backoff_time = 2s
queue_run_delay = 1s
"""


@pytest.fixture
def vrelay(relay_factory, tmp_path):
    """vrelay(extra_main_cf="") -> Relay with the alias table above and two more mailboxes."""
    from conftest import BASE_VMAILBOX, make_searchable
    table = tmp_path / "valias"
    table.write_text(VALIAS)
    make_searchable(table)

    def start(extra=""):
        return relay_factory(EXTRA.replace("{dir}/valias", str(table)) + extra,
                             vmailbox=BASE_VMAILBOX + VMAILBOX_EXTRA)
    return start


def send(port, rcpts, body="Subject: t\r\n\r\nhello\r\n", sender="s@sender.example"):
    """One transaction; returns the RCPT replies and the end-of-data reply (None when no RCPT passed)."""
    c = SmtpConn(port)
    c.ehlo()
    c.cmd(f"MAIL FROM:<{sender}>", 250)
    replies = [c.cmd(f"RCPT TO:<{r}>") for r in rcpts]
    end = None
    if any(r.startswith("250") for r in replies):
        c.cmd("DATA", 354)
        c.send(body + ".\r\n")
        end = c.reply()
    c.quit()
    return replies, end


def box(relay, name):
    return relay.maildir_files(f"example.test/{name}/")


def wait_boxes(relay, **counts):
    """Waits until each named mailbox holds that many messages (mail for several recipients is
    delivered through the queue, a moment after the 250)."""
    wait_until(lambda: all(len(box(relay, n)) == k for n, k in counts.items()), 15, f"mailboxes {counts}")


def test_alias_domain_one_to_many(vrelay):
    r = vrelay()
    replies, end = send(r.port(), ["team@alias.test"])
    assert replies == ["250 2.1.5 Ok"]
    assert end.startswith("250 2.0.0 Ok: queued as ")
    qid = end.split()[-1]
    wait_boxes(r, alice=1, bob=1)
    stored = box(r, "alice")[0].read_bytes()
    assert stored.endswith(b"\r\nhello\r\n")
    # X-Original-To: the alias, Delivered-To: the mailbox (Postfix's virtual(8) trace headers)
    assert b"\r\nX-Original-To: team@alias.test\r\nDelivered-To: alice@example.test\r\n" in stored
    assert r.wait_log(f"{qid}: to=<alice@example.test>, orig_to=<team@alias.test>, relay=virtual", timeout=15)
    assert r.wait_log(f"{qid}: to=<bob@example.test>, orig_to=<team@alias.test>, relay=virtual", timeout=15)


def test_unknown_user_of_alias_domain(vrelay):
    r = vrelay()
    replies, _ = send(r.port(), ["nobody@alias.test"])
    assert replies == ["550 5.1.1 <nobody@alias.test>: Recipient address rejected: "
                       "User unknown in virtual alias table"]
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.1.1 <nobody@alias.test>: Recipient address "
            "rejected: User unknown in virtual alias table; from=<s@sender.example> to=<nobody@alias.test>") in r.log()


def test_recursion(vrelay):
    r = vrelay()
    replies, end = send(r.port(), ["deep@alias.test"])
    assert replies == ["250 2.1.5 Ok"] and end.startswith("250 ")
    assert len(box(r, "bob")) == 1 and box(r, "alice") == []


def test_expands_to_itself_is_kept(vrelay):
    r = vrelay()
    replies, end = send(r.port(), ["keep@example.test"])
    assert replies == ["250 2.1.5 Ok"] and end.startswith("250 ")
    wait_boxes(r, keep=1, alice=1)


def test_loop_is_refused_not_looped(vrelay):
    r = vrelay()
    replies, end = send(r.port(), ["loop1@alias.test", "team@alias.test"])
    assert replies == ["451 4.3.0 <loop1@alias.test>: Temporary lookup failure", "250 2.1.5 Ok"]
    assert end.startswith("250 ")
    assert "warning: NOQUEUE: unreasonable virtual_alias_maps map nesting for loop1@alias.test -- message " \
           "not accepted" in r.log()
    # the session goes on: the other recipient was delivered
    wait_boxes(r, alice=1, bob=1)


def test_expansion_limit(vrelay):
    r = vrelay()
    replies, _ = send(r.port(), ["big@alias.test"])
    assert replies == ["451 4.3.0 <big@alias.test>: Temporary lookup failure"]
    assert "unreasonable virtual_alias_maps map expansion size for big@alias.test" in r.log()
    assert box(r, "alice") == [] and box(r, "dave") == []


def test_user_tag_with_propagated_extension(vrelay):
    r = vrelay()
    # carol+news@ has no entry; carol@ has: alice@example.test, with the extension propagated
    # (propagate_unmatched_extensions = canonical, virtual); alice+news@ is alice's mailbox
    replies, end = send(r.port(), ["carol+news@alias.test", "bob+x@example.test"])
    assert replies == ["250 2.1.5 Ok", "250 2.1.5 Ok"] and end.startswith("250 ")
    qid = end.split()[-1]
    wait_boxes(r, alice=1, bob=1)
    assert r.wait_log(f"{qid}: to=<alice+news@example.test>, orig_to=<carol+news@alias.test>, relay=virtual",
                      timeout=15)
    assert r.wait_log(f"{qid}: to=<bob+x@example.test>, relay=virtual", timeout=15)


def test_user_tag_without_propagation(vrelay):
    """propagate_unmatched_extensions without "virtual": carol+news@ goes to alice@ itself."""
    r = vrelay("propagate_unmatched_extensions = canonical\n")
    replies, end = send(r.port(), ["carol+news@alias.test"])
    assert replies == ["250 2.1.5 Ok"] and end.startswith("250 ")
    assert f"{end.split()[-1]}: to=<alice@example.test>, orig_to=<carol+news@alias.test>" in r.log()


def test_no_delimiter_means_no_extension(relay_factory):
    r = relay_factory("recipient_delimiter =\n")
    replies, _ = send(r.port(), ["bob+x@example.test"])
    assert replies == ["550 5.1.1 <bob+x@example.test>: Recipient address rejected: User unknown in virtual "
                       "mailbox table"]


def test_target_that_does_not_resolve_bounces(vrelay):
    """An alias whose target has no mailbox: accepted (Postfix's smtpd accepts what virtual_alias_maps
    know), then bounced by the queue manager, as Postfix's cleanup and qmgr would."""
    r = vrelay()
    replies, end = send(r.port(), ["ghost@alias.test"], sender="")
    assert replies == ["250 2.1.5 Ok"] and end.startswith("250 ")
    qid = end.split()[-1]
    assert r.wait_log(f"{qid}: to=<nobody@example.test>", timeout=10)
    assert re.search(rf"{qid}: to=<nobody@example.test>.*status=bounced", r.log())


def test_vrfy_and_alias_domain_not_relay_denied(vrelay):
    r = vrelay()
    c = SmtpConn(r.port())
    c.ehlo()
    c.cmd("MAIL FROM:<s@sender.example>", 250)
    # an alias domain is an authorized destination: not "Relay access denied"
    assert c.cmd("RCPT TO:<team@other.alias.test>").startswith("554 5.7.1")
    assert c.cmd("RCPT TO:<team@alias.test>") == "250 2.1.5 Ok"
    assert c.cmd("VRFY team@alias.test") == "252 2.0.0 team@alias.test"
    assert c.cmd("VRFY nobody@alias.test") == ("550 5.1.1 <nobody@alias.test>: Recipient address rejected: User "
                                               "unknown in virtual alias table")
    c.quit()


def test_sendmail_by_root_is_rewritten(vrelay):
    """ktrelay sendmail run by root queues directly: the same canonical and virtual alias rewriting."""
    import subprocess
    from conftest import BIN
    r = vrelay()
    p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), "-f", "s@sender.example", "team@alias.test"],
                       input=b"Subject: from root\n\nhi\n", capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    wait_until(lambda: len(box(r, "alice")) == 1 and len(box(r, "bob")) == 1, 15, "both copies")
    # the daemon's queue manager delivers what sendmail queued, with the original recipient
    wait_until(lambda: re.search(r"[0-9A-F]+: to=<bob@example.test>, orig_to=<team@alias.test>, relay=virtual",
                                 r.log()), 10, "the queue manager's delivery line")
    # an alias loop is not queued at all
    p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), "loop1@alias.test"], input=b"Subject: x\n\nx\n",
                       capture_output=True, timeout=30)
    assert p.returncode == 75, p.stderr
    assert b"sendmail: <loop1@alias.test>: unreasonable virtual alias expansion; message not queued" in p.stderr


def test_sendmail_through_maildrop_is_rewritten(world, user):
    """A non-root user's message goes through maildrop/: the daemon's pickup rewrites it."""
    from test_ops_sendmail import as_user, start
    r = start(world, f"virtual_alias_maps = inline:{{ {{ team@alias.test = alice@example.test, bob@example.test }} }}\n"
                     "virtual_alias_domains = alias.test\n")
    try:
        env = {"PATH": "/usr/bin:/bin", "KTRELAY_CONFIG": str(r.dir), "HOME": "/", "LOGNAME": user.pw_name}
        p = as_user(user, [BIN_, "sendmail", "team@alias.test"], b"Subject: x\n\nx\n", env)
        assert p.returncode == 0, p.stderr
        wait_until(lambda: len(box(r, "alice")) == 1 and len(box(r, "bob")) == 1, 15, "both copies")
        log = (world / "maillog").read_text()
        assert re.search(r": to=<alice@example.test>, orig_to=<team@alias.test>, relay=virtual", log), log
    finally:
        r.stop()


def test_access_tables_strip_the_extension(vrelay, tmp_path):
    """access(5) with recipient_delimiter: user+foo@domain, user@domain, domain, user+foo@, user@."""
    from conftest import make_searchable
    access = tmp_path / "access"
    access.write_text("bob@example.test REJECT no mail for bob\nnews@ REJECT no news\n")
    make_searchable(access)
    r = vrelay(f"smtpd_recipient_restrictions = check_recipient_access texthash:{access}\n")
    c = SmtpConn(r.port())
    c.ehlo()
    c.cmd("MAIL FROM:<s@sender.example>", 250)
    assert c.cmd("RCPT TO:<bob+list@example.test>") == ("554 5.7.1 <bob+list@example.test>: Recipient address "
                                                        "rejected: no mail for bob")
    assert c.cmd("RCPT TO:<news+x@example.test>") == ("554 5.7.1 <news+x@example.test>: Recipient address "
                                                      "rejected: no news")
    assert c.cmd("RCPT TO:<alice+list@example.test>") == "250 2.1.5 Ok"
    c.quit()


def test_default_alias_domains_are_the_domain_keys(relay_factory, tmp_path):
    """virtual_alias_domains = $virtual_alias_maps (Postfix's default): a domain is of the alias class when
    it is a key of the table, virtual(5)'s "example.com anything" line."""
    from conftest import make_searchable
    t = tmp_path / "valias"
    t.write_text("alias2.test anything\nx@alias2.test alice@example.test\n")
    make_searchable(t)
    r = relay_factory(f"virtual_alias_maps = texthash:{t}\n")
    replies, end = send(r.port(), ["x@alias2.test", "y@alias2.test", "x@other.test"])
    assert replies == ["250 2.1.5 Ok",
                       "550 5.1.1 <y@alias2.test>: Recipient address rejected: User unknown in virtual alias table",
                       "554 5.7.1 <x@other.test>: Relay access denied"]
    assert end.startswith("250 ") and len(box(r, "alice")) == 1
