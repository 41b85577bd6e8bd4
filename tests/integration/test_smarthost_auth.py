"""SMTP AUTH towards a smarthost, as Postfix's smtp(8) does it (smtp_sasl_auth_enable,
smtp_sasl_password_maps, the security options, the mechanism filter, sender-dependent credentials,
smtp_sasl_auth_soft_bounce). The smarthost is a second ktrelay that requires STARTTLS and AUTH
(built-in password file) from every client; the front node relays to it through relayhost."""
import re

import pytest

from conftest import make_cert
from test_auth import password_file
from test_relay import BODY, nodes, wait_for  # noqa: F401  (fixture)

PASSWORD = "s3cret: pass"         # a colon and a space: the value splits at the first colon only


@pytest.fixture
def smarthost(nodes, tmp_path):
    """smarthost(tls=True) -> a ktrelay that refuses every client that has not authenticated; with tls,
    AUTH and mail only after STARTTLS, else AUTH offered in the clear."""
    def start(tls=True):
        cert, key = make_cert(tmp_path)
        pw = tmp_path / "smarthost-passwd"
        password_file(pw, {"alice": PASSWORD, "bob": "bobs " + PASSWORD})
        svc = {"smtpd_sasl_auth_enable": "yes", "smtpd_client_restrictions": "permit_sasl_authenticated,reject"}
        if tls:
            svc.update({"smtpd_tls_security_level": "encrypt", "smtpd_tls_cert_file": str(cert),
                        "smtpd_tls_key_file": str(key)})
        return nodes(f"ktrelay_sasl_password_file = {pw}\n", services={"smtp": svc}).start()
    return start


def front_node(nodes, smarthost_port, passwd, extra=""):
    """A node that relays everything (its own domain is only localhost) to the smarthost over STARTTLS."""
    n = nodes("virtual_mailbox_domains = localhost\n"
              f"relayhost = [127.0.0.1]:{smarthost_port}\n"
              "smtp_tls_security_level = may\n"
              "smtp_sasl_auth_enable = yes\n"
              "smtp_sasl_password_maps = texthash:{dir}/sasl_passwd\n"
              "smtp_sasl_tls_security_options = noanonymous\n" + extra)
    n.d.mkdir(exist_ok=True)
    (n.d / "sasl_passwd").write_text(passwd)
    return n.start()


@pytest.mark.parametrize("filt,mech", [("", "PLAIN"), ("smtp_sasl_mechanism_filter = !plain, static:all\n", "LOGIN")])
def test_relay_through_smarthost_with_auth(nodes, smarthost, filt, mech):
    sh = smarthost()
    port = sh.r.port()
    front = front_node(nodes, port, f"[127.0.0.1]:{port} alice:{PASSWORD}\n", filt)
    qid = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{port}, "
                          r".*dsn=2\.0\.0, status=sent \(250 2\.0\.0 Ok: queued as [0-9A-F]+\)"), front.log()
    assert sh.wait_log(rf"client=unknown\[127\.0\.0\.1\], sasl_method={mech}, sasl_username=alice"), sh.log()
    files = wait_for(lambda: sh.r.maildir_files("example.test/bob/"))
    assert len(files) == 1 and files[0].read_bytes().endswith(b"\r\n.leading dot\r\n..two dots\r\nlast\r\n")
    # the smarthost saw TLS before AUTH
    assert sh.wait_log(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=2 starttls=1 auth=1 mail=1 rcpt=1"), sh.log()
    assert PASSWORD not in front.log()


def test_wrong_password_defers_with_the_smarthost_reply(nodes, smarthost):
    sh = smarthost()
    port = sh.r.port()
    front = front_node(nodes, port, f"[127.0.0.1]:{port} alice:wrong\n")
    qid = front.sendmail(["bob@example.test"], BODY)
    said = (r"SASL authentication failed; server 127\.0\.0\.1\[127\.0\.0\.1\] said: "
            r"535 5\.7\.8 Error: authentication failed: [^)]*")
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=none, .*dsn=4\.7\.8, status=deferred \({said}\)"), \
        front.log()
    assert [f.name for f in front.queue_files()] == [qid]
    assert sh.r.maildir_files("example.test/bob/") == []
    # the front took its leave with QUIT after the refusal
    assert sh.wait_log(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=2 starttls=1 auth=0/1 quit=1 commands=5"), \
        sh.log()
    assert "status=bounced" not in front.log()


def test_wrong_password_bounces_without_soft_bounce(nodes, smarthost):
    sh = smarthost()
    port = sh.r.port()
    front = front_node(nodes, port, f"[127.0.0.1]:{port} alice:wrong\n", "smtp_sasl_auth_soft_bounce = no\n")
    qid = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=none, .*dsn=5\.7\.8, status=bounced \(SASL "
                          r"authentication failed; server 127\.0\.0\.1\[127\.0\.0\.1\] said: 535 5\.7\.8 "), front.log()


def test_no_auth_in_the_clear(nodes, smarthost):
    """The smarthost offers AUTH PLAIN LOGIN without STARTTLS; with the default
    smtp_sasl_security_options (noplaintext) the password is never sent: the mail is deferred."""
    sh = smarthost(tls=False)
    port = sh.r.port()
    front = front_node(nodes, port, f"[127.0.0.1]:{port} alice:{PASSWORD}\n")
    qid = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{qid}: to=<bob@example.test>, relay=none, .*dsn=4\.7\.0, status=deferred \(SASL "
                          r"authentication failed; cannot authenticate to server 127\.0\.0\.1\[127\.0\.0\.1\]: no "
                          r"mechanism available without TLS \(smtp_sasl_security_options\)\)"), front.log()
    # the smarthost heard EHLO and QUIT, never AUTH
    assert sh.wait_log(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=1 quit=1 commands=2"), sh.log()
    assert "auth=" not in sh.log() and "sasl_" not in sh.log()
    # allowing plaintext mechanisms without TLS is the operator's choice
    front2 = front_node(nodes, port, f"[127.0.0.1]:{port} alice:{PASSWORD}\n", "smtp_sasl_security_options = noanonymous\n")
    qid2 = front2.sendmail(["bob@example.test"], BODY)
    assert front2.wait_log(rf"{qid2}: to=<bob@example.test>, .*status=sent"), front2.log()
    assert sh.wait_log(r"sasl_method=PLAIN, sasl_username=alice"), sh.log()


def test_sender_dependent_credentials(nodes, smarthost):
    sh = smarthost()
    port = sh.r.port()
    front = front_node(nodes, port,
                       "alice@example.test alice:" + PASSWORD + "\n"
                       "@example.org bob:bobs " + PASSWORD + "\n"
                       f"[127.0.0.1]:{port} nobody:nothing\n",
                       "smtp_sender_dependent_authentication = yes\n")
    q1 = front.sendmail(["bob@example.test"], BODY, sender="alice@example.test")
    q2 = front.sendmail(["bob@example.test"], BODY, sender="carol@example.org")
    q3 = front.sendmail(["bob@example.test"], BODY, sender="dave@elsewhere.test")
    assert front.wait_log(rf"{q1}: to=<bob@example.test>, .*status=sent"), front.log()
    assert front.wait_log(rf"{q2}: to=<bob@example.test>, .*status=sent"), front.log()
    # no sender key: the next hop's entry, whose user the smarthost does not know
    assert front.wait_log(rf"{q3}: to=<bob@example.test>, relay=none, .*status=deferred \(SASL authentication "
                          r"failed; server 127\.0\.0\.1\[127\.0\.0\.1\] said: 535 "), front.log()
    log = sh.log()
    ids = {m.group(1): m.group(2) for m in re.finditer(r"([0-9A-F]+): client=unknown\[127\.0\.0\.1\], "
                                                      r"sasl_method=PLAIN, sasl_username=(\w+)", log)}
    # the smarthost's queue ids map to its own from= lines: who sent what under which login
    senders = dict(re.findall(r"([0-9A-F]+): from=<([^>]*)>", log))
    assert sorted((senders[i], u) for i, u in ids.items()) == [("alice@example.test", "alice"),
                                                               ("carol@example.org", "bob")], log
