"""Relay control: the open-relay test set from a client outside mynetworks
(127.0.0.2 with mynetworks = 127.0.0.1/32), relaying for trusted and
authenticated clients, and the smtpd_*_restrictions with access tables.

Every address trick that has fooled relays is tried on every kind of domain
ktrelay knows (local, virtual, relay) and must be refused with 554 5.7.1
Relay access denied; nothing may be delivered and nothing queued."""
import subprocess
import time

import pytest

from conftest import BIN
from test_auth import client, PASSWORD, password_file, plain, send_message

RELAY_MAIN_CF = """\
mydestination = $myhostname
relay_domains = relay.example
mynetworks = 127.0.0.1/32
"""

# (RCPT argument, why it is a trick)
TRICKS = [
    ("<victim@remote.example>", "plain remote address"),
    ("<victim@REMOTE.Example>", "case"),
    ("<victim%remote.example@mx.example.test>", "percent hack via a local domain"),
    ("<victim%remote.example@example.test>", "percent hack via a virtual domain"),
    ("<victim%remote.example@relay.example>", "percent hack via a relay domain"),
    ("<victim%remote.example%mx.example.test@mx.example.test>", "nested percent hack"),
    ("<victim%remote.example@[127.0.0.1]>", "percent hack via an IP literal"),
    ("<remote.example!victim@mx.example.test>", "bang path via a local domain"),
    ("<remote.example!victim@example.test>", "bang path via a virtual domain"),
    ("<remote.example!victim@relay.example>", "bang path via a relay domain"),
    ("<remote.example!victim>", "bare bang path"),
    ("<@mx.example.test:victim@remote.example>", "source route to a remote address"),
    ("<@mx.example.test,@example.test:victim@remote.example>", "two-hop source route"),
    ("<@remote.example:root@mx.example.test>", "source route ending locally"),
    ('<"victim@remote.example"@mx.example.test>', "quoted @ via a local domain"),
    ('<"victim@remote.example"@example.test>', "quoted @ via a virtual domain"),
    ('<"victim%remote.example"@mx.example.test>', "quoted percent hack"),
    ("<victim@[198.51.100.7]>", "IPv4 literal"),
    ("<victim@[127.0.0.1]>", "IPv4 literal of this host"),
    ("<victim@[IPv6:::1]>", "IPv6 literal"),
    ("victim@remote.example", "no angle brackets"),
]


def wait_files(relay, box, n, timeout=20):
    """True once the Maildir holds n messages (the queue manager delivers in the background)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(relay.maildir_files(box)) >= n:
            return len(relay.maildir_files(box)) == n
        time.sleep(0.1)
    return False


def rcpt_addr(arg):
    """The address as the server reports it: brackets and any source route removed."""
    a = arg[1:-1] if arg.startswith("<") else arg
    return a.split(":", 1)[1] if a.startswith("@") else a


@pytest.fixture
def outside(relay_factory):
    return relay_factory(RELAY_MAIN_CF)


@pytest.mark.parametrize("arg,why", TRICKS, ids=[t[1] for t in TRICKS])
def test_open_relay_trick_is_refused(outside, arg, why):
    c = client(outside.port())
    c.ehlo()
    assert c.cmd("MAIL FROM:<spammer@remote.example>") == "250 2.1.0 Ok"
    assert c.cmd(f"RCPT TO:{arg}") == f"554 5.7.1 <{rcpt_addr(arg)}>: Relay access denied", why
    assert c.cmd("DATA") == "554 5.5.1 Error: no valid recipients"
    assert c.cmd("QUIT").startswith("221")
    assert outside.wait_log("disconnect from unknown[127.0.0.2]")
    log = outside.log()
    assert "NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 554 5.7.1" in log
    assert "queued as" not in log


def test_all_tricks_in_one_pipelined_transaction_with_bdat(relay_factory):
    """The same set pipelined in one write, then BDAT: still nothing gets through."""
    outside = relay_factory(RELAY_MAIN_CF + "smtpd_hard_error_limit = 100\n")
    c = client(outside.port())
    c.ehlo()
    c.send("MAIL FROM:<spammer@remote.example>\r\n" + "".join(f"RCPT TO:{a}\r\n" for a, _ in TRICKS) +
           "BDAT 5 LAST\r\nhello")
    assert c.reply() == "250 2.1.0 Ok"
    for arg, why in TRICKS:
        assert c.reply().startswith("554 5.7.1"), why
    assert c.reply() == "554 5.5.1 Error: no valid recipients"
    assert outside.maildir_files() == []


def test_local_delivery_from_outside_still_works(outside):
    c = client(outside.port())
    c.ehlo()
    assert send_message(c, "someone@remote.example", ["bob@example.test"]).startswith("250 2.0.0 Ok: queued as")
    assert len(outside.maildir_files("example.test/bob/")) == 1
    # relay_domains: an authorized destination for anybody
    assert c.cmd("MAIL FROM:<someone@remote.example>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<x@relay.example>") == "250 2.1.5 Ok"
    assert c.cmd("RCPT TO:<alice@example.test>") == "250 2.1.5 Ok"
    # a message with a relay recipient goes through the outbound queue, which also delivers the local one
    assert c.cmd("DATA").startswith("354")
    assert c.cmd("Subject: t\r\n\r\nx\r\n.").startswith("250 2.0.0 Ok: queued as ")
    assert wait_files(outside, "example.test/alice/", 1)
    assert c.cmd("NOOP") == "250 2.0.0 Ok"


def test_trusted_network_relays_and_rewrites(outside):
    c = client(outside.port(), src="127.0.0.1")
    c.ehlo()
    assert c.cmd("MAIL FROM:<app@example.test>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<victim@remote.example>") == "250 2.1.5 Ok"
    # the percent hack works for trusted clients, and is resolved to where it goes
    assert c.cmd("RCPT TO:<bob%example.test@mx.example.test>") == "250 2.1.5 Ok"
    c.send("BDAT 7 LAST\r\nhello\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as ")
    assert wait_files(outside, "example.test/bob/", 1)
    # and an all-local message still goes straight to the Maildir
    assert send_message(c, "app@example.test", ["bob%example.test@mx.example.test"]).startswith("250 2.0.0 Ok")
    assert wait_files(outside, "example.test/bob/", 2)


def test_authenticated_client_relays_with_swaks(relay_factory, tmp_path):
    pw = tmp_path / "passwd"
    password_file(pw, {"alice": PASSWORD})
    r = relay_factory(RELAY_MAIN_CF + f"smtpd_sasl_auth_enable = yes\nktrelay_sasl_password_file = {pw}\n")
    base = ["swaks", "--server", f"127.0.0.1:{r.port()}", "--local-interface", "127.0.0.2", "--from",
            "alice@example.test", "--to", "friend@remote.example", "--helo", "client.example.net", "--quit-after",
            "RCPT", "--timeout", "20"]
    out = subprocess.run(base, capture_output=True, text=True)
    assert "554 5.7.1 <friend@remote.example>: Relay access denied" in out.stdout, out.stdout
    out = subprocess.run(base + ["--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORD],
                         capture_output=True, text=True)
    assert "235 2.7.0 Authentication successful" in out.stdout, out.stdout
    assert "<-  250 2.1.5 Ok" in out.stdout, out.stdout
    out = subprocess.run(base + ["--auth", "LOGIN", "--auth-user", "alice", "--auth-password", "wrong"],
                         capture_output=True, text=True)
    assert "535 5.7.8 Error: authentication failed" in out.stdout, out.stdout


def test_mynetworks_table_reference(relay_factory, tmp_path):
    (tmp_path / "nets").write_text("127.0.0.2/32 OK\n")
    r = relay_factory(RELAY_MAIN_CF + f"mynetworks = cidr:{tmp_path}/nets\n")
    c = client(r.port())
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@example.test>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<victim@remote.example>") == "250 2.1.5 Ok"
    c = client(r.port(), src="127.0.0.1")
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@example.test>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<victim@remote.example>") == "554 5.7.1 <victim@remote.example>: Relay access denied"


def test_postfix_default_relay_restrictions_defer(relay_factory):
    r = relay_factory(RELAY_MAIN_CF + "smtpd_relay_restrictions = "
                                      "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination\n")
    c = client(r.port())
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@remote.example>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<victim%remote.example@mx.example.test>") == \
        "454 4.7.1 <victim%remote.example@mx.example.test>: Relay access denied"


def test_access_tables_and_fqdn_checks(relay_factory, tmp_path):
    (tmp_path / "clients.cidr").write_text("127.0.0.3/32 REJECT go away\n")
    (tmp_path / "senders").write_text("spam.example 550 5.7.1 no spam please\nfriend.example OK\n"
                                      "tempfail.example DEFER\n")
    (tmp_path / "rcpts").write_text("alice@example.test REJECT alice is on holiday\n")
    r = relay_factory(RELAY_MAIN_CF +
                      f"smtpd_client_restrictions = check_client_access cidr:{tmp_path}/clients.cidr\n"
                      f"smtpd_sender_restrictions = reject_non_fqdn_sender, "
                      f"check_sender_access texthash:{tmp_path}/senders\n"
                      f"smtpd_recipient_restrictions = reject_non_fqdn_recipient, "
                      f"check_recipient_access texthash:{tmp_path}/rcpts\n"
                      f"smtpd_reject_unlisted_sender = yes\n")
    c = client(r.port(), src="127.0.0.3")
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@remote.example>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@example.test>") == "554 5.7.1 <unknown[127.0.0.3]>: Client host rejected: go away"

    c = client(r.port())
    c.ehlo()
    cases = [
        ("x@sub.spam.example", "bob@example.test", "550 5.7.1 <x@sub.spam.example>: Sender address rejected: "
                                                   "no spam please"),
        ("x@tempfail.example", "bob@example.test", "450 4.7.1 <x@tempfail.example>: Sender address rejected: "
                                                   "Access denied"),
        ("x", "bob@example.test", "504 5.5.2 <x>: Sender address rejected: need fully-qualified address"),
        ("nobody@example.test", "bob@example.test", "550 5.1.0 <nobody@example.test>: Sender address rejected: "
                                                    "User unknown in virtual mailbox table"),
        ("x@friend.example", "bob", "504 5.5.2 <bob>: Recipient address rejected: need fully-qualified address"),
        ("x@friend.example", "alice@example.test", "554 5.7.1 <alice@example.test>: Recipient address rejected: "
                                                   "alice is on holiday"),
        # OK in the sender list does not open the relay
        ("x@friend.example", "victim@remote.example", "554 5.7.1 <victim@remote.example>: Relay access denied"),
        ("x@friend.example", "bob@example.test", "250 2.1.5 Ok"),
        ("", "bob@example.test", "250 2.1.5 Ok"),
    ]
    for sender, rcpt, want in cases:
        assert c.cmd(f"MAIL FROM:<{sender}>") == "250 2.1.0 Ok"
        assert c.cmd(f"RCPT TO:<{rcpt}>") == want, (sender, rcpt)
        assert c.cmd("RSET").startswith("250")
    assert r.wait_log("NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 550 5.7.1 <x@sub.spam.example>: Sender "
                      "address rejected: no spam please; from=<x@sub.spam.example> to=<bob@example.test> "
                      "proto=ESMTP helo=<client.example.net>")


def test_reject_unauth_pipelining(relay_factory):
    r = relay_factory(RELAY_MAIN_CF + "smtpd_recipient_restrictions = reject_unauth_pipelining\n")
    c = client(r.port())
    assert c.cmd("HELO client.example.net").startswith("250")
    c.send("MAIL FROM:<a@remote.example>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    assert c.reply() == "250 2.1.0 Ok"
    assert c.reply() == ("503 5.5.0 <unknown[127.0.0.2]>: Client host rejected: "
                         "Improper use of SMTP command pipelining")
    # ESMTP clients may pipeline
    c = client(r.port())
    c.ehlo()
    c.send("MAIL FROM:<a@remote.example>\r\nRCPT TO:<bob@example.test>\r\nRSET\r\n")
    assert c.reply() == "250 2.1.0 Ok"
    assert c.reply() == "250 2.1.5 Ok"


@pytest.mark.parametrize("conf,message", [
    ("smtpd_relay_restrictions = permit_mynetworks\n", "would be an open relay"),
    ("smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destinaton\n", "reject_unauth_destinaton"),
    ("smtpd_sender_restrictions = reject_sender_login_mismatch\n", "smtpd_sender_login_maps"),
    ("smtpd_sender_restrictions = check_sender_access\n", "needs a type:table argument"),
    ("mynetworks_style = planet\n", "mynetworks_style"),
])
def test_unsafe_or_broken_restrictions_are_refused(tmp_path, conf, message):
    (tmp_path / "main.cf").write_text("alias_maps =\n" + conf)
    out = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 78
    assert message in out.stderr, out.stderr
