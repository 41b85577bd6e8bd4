"""SASL AUTH (RFC 4954) against a real ktrelay: PLAIN and LOGIN with and
without initial responses, the built-in crypt(3) password file and a real
Dovecot auth server, TLS-only AUTH, the classic submission profile from
master.cf, failure replies, slow-down and disconnection after repeated
failures, sender login mismatch, and the Postfix-style log lines.

Clients connect from 127.0.0.2, outside every mynetworks used here, so that
relaying depends on authentication alone."""
import base64
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import time

import pytest

from conftest import SmtpConn, make_cert, stop_process

SRC_ADDR = "127.0.0.2"
PASSWORD = "s3cret pass"          # a space, so that nothing splits it


def b64(text):
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def plain(user, password, authzid=""):
    return b64(f"{authzid}\0{user}\0{password}")


def client(port, src=SRC_ADDR, timeout=20):
    """The AUTH tests' client comes from outside mynetworks (127.0.0.1/32) unless told otherwise."""
    return SmtpConn(port, src=src, timeout=timeout)


def auth_lines(ehlo):
    return [l[4:] for l in ehlo if l[4:].startswith("AUTH")]


def send_message(c, sender, rcpts, body="Subject: t\r\n\r\nhello\r\n"):
    """MAIL, RCPT..., DATA; returns the final reply (or the first failing one)."""
    r = c.cmd(f"MAIL FROM:<{sender}>")
    if not r.startswith("250"):
        return r
    for rc in rcpts:
        r = c.cmd(f"RCPT TO:<{rc}>")
        if not r.startswith("250"):
            return r
    r = c.cmd("DATA")
    if not r.startswith("354"):
        return r
    return c.cmd(body + ".")


def password_file(path, users):
    lines = []
    for user, pw in users.items():
        h = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=pw, capture_output=True, text=True,
                           check=True).stdout.strip()
        lines.append(f"{user}:{h}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def auth_relay(relay_factory, tmp_path):
    """relay(extra_main_cf, services, users) -> Relay with TLS certificates, a password file
    (alice and bob, both with PASSWORD unless users says otherwise) and SASL switched on."""
    cert, key = make_cert(tmp_path)

    def start(extra="", services=None, users=None):
        pwfile = tmp_path / f"sasl-passwd-{len(list(tmp_path.glob('sasl-passwd-*')))}"
        password_file(pwfile, users or {"alice": PASSWORD, "bob": PASSWORD})
        main_cf = (f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n"
                   f"smtpd_tls_security_level = may\n"
                   f"ktrelay_sasl_password_file = {pwfile}\n"
                   f"smtpd_sasl_auth_enable = yes\n"
                   f"mynetworks = 127.0.0.1/32\n" + extra)
        return relay_factory(main_cf, services=services)
    return start


def test_auth_not_enabled_by_default(relay):
    c = client(relay.port())
    assert auth_lines(c.ehlo()) == []
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "503 5.5.1 Error: authentication not enabled"


def test_plain_with_initial_response_allows_relay(auth_relay):
    r = auth_relay()
    c = client(r.port())
    assert auth_lines(c.ehlo()) == ["AUTH PLAIN LOGIN"]
    assert c.cmd("MAIL FROM:<alice@example.test>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<friend@remote.example>") == "554 5.7.1 <friend@remote.example>: Relay access denied"
    assert c.cmd("RSET").startswith("250")
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "235 2.7.0 Authentication successful"
    # accepted for relaying: into the outbound queue
    assert send_message(c, "alice@example.test", ["friend@remote.example"]).startswith("250 2.0.0 Ok: queued as ")
    assert r.wait_log("client=unknown[127.0.0.2], sasl_method=PLAIN, sasl_username=alice")
    assert c.cmd("QUIT").startswith("221")
    assert r.wait_log("disconnect from unknown[127.0.0.2] ehlo=1 auth=1 mail=2 rcpt=1/2 data=1 rset=1 quit=1 "
                      "commands=9")
    assert r.maildir_files() == []


def test_plain_without_initial_response_and_empty_authzid_forms(auth_relay):
    r = auth_relay()
    c = client(r.port())
    c.ehlo()
    assert c.cmd("AUTH PLAIN") == "334 "
    assert c.cmd(plain("bob", PASSWORD, authzid="bob")) == "235 2.7.0 Authentication successful"
    # a different authorization identity is not granted
    c2 = client(r.port())
    c2.ehlo()
    assert c2.cmd("AUTH PLAIN " + plain("bob", PASSWORD, authzid="alice")).startswith("535 5.7.8")


def test_login_mechanism(auth_relay):
    r = auth_relay()
    c = client(r.port())
    c.ehlo()
    assert c.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert c.cmd(b64("alice")) == "334 UGFzc3dvcmQ6"
    assert c.cmd(b64(PASSWORD)) == "235 2.7.0 Authentication successful"
    assert c.cmd("MAIL FROM:<alice@example.test>") == "250 2.1.0 Ok"
    # logged, as by Postfix, at the first accepted recipient
    assert c.cmd("RCPT TO:<bob@example.test>") == "250 2.1.5 Ok"
    assert r.wait_log("sasl_method=LOGIN, sasl_username=alice")
    # LOGIN with the user name as initial response
    c = client(r.port())
    c.ehlo()
    assert c.cmd("AUTH login " + b64("bob")) == "334 UGFzc3dvcmQ6"
    assert c.cmd(b64(PASSWORD)) == "235 2.7.0 Authentication successful"


def test_wrong_password_slows_down_then_disconnects(auth_relay):
    r = auth_relay()
    c = client(r.port())
    c.ehlo()
    assert c.cmd("AUTH PLAIN " + plain("alice", "wrong")) == \
        "535 5.7.8 Error: authentication failed: authentication failure"
    assert r.wait_log("warning: unknown[127.0.0.2]: SASL PLAIN authentication failed: authentication failure")
    t0 = time.monotonic()
    assert c.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert c.cmd(b64("alice")) == "334 UGFzc3dvcmQ6"
    assert c.cmd(b64("wrong")).startswith("535 5.7.8")
    assert time.monotonic() - t0 >= 0.9          # the second failure waits smtpd_error_sleep_time
    assert r.wait_log("SASL LOGIN authentication failed")
    # the third failure ends the session
    assert c.cmd("AUTH PLAIN " + plain("nosuchuser", PASSWORD)).startswith("535 5.7.8")
    assert c.reply() == "421 4.7.0 mx.example.test Error: too many authentication failures"
    assert c.closed()
    assert r.wait_log("too many authentication failures from unknown[127.0.0.2]")
    # a new connection does not start from zero: its first failure is already delayed
    c = client(r.port())
    c.ehlo()
    t0 = time.monotonic()
    assert c.cmd("AUTH PLAIN " + plain("alice", "wrong")).startswith("535 5.7.8")
    assert time.monotonic() - t0 >= 2.5
    # the right password still works and is answered at once
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "235 2.7.0 Authentication successful"


def test_malformed_base64(auth_relay):
    r = auth_relay()
    c = client(r.port())
    c.ehlo()
    assert c.cmd("AUTH PLAIN AGFsaWNl!!!") == "501 5.5.2 Invalid base64 data in initial response"
    assert c.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert c.cmd("not base64") == "501 5.5.2 Invalid base64 data in continued response"
    assert c.cmd("AUTH PLAIN") == "334 "
    assert c.cmd("YWJj=") == "501 5.5.2 Invalid base64 data in continued response"
    # the session goes on as a normal one
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "235 2.7.0 Authentication successful"


def test_auth_twice_and_other_sequence_errors(auth_relay):
    r = auth_relay()
    c = client(r.port())
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "503 5.5.1 Error: send HELO/EHLO first"
    c.ehlo()
    assert c.cmd("AUTH") == "501 5.5.4 Syntax: AUTH mechanism"
    assert c.cmd("AUTH CRAM-MD5") == "504 5.5.4 Unrecognized authentication type"
    assert c.cmd("MAIL FROM:<a@example.test>") == "250 2.1.0 Ok"
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "503 5.5.1 Error: MAIL transaction in progress"
    assert c.cmd("RSET").startswith("250")
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "235 2.7.0 Authentication successful"
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "503 5.5.1 Error: already authenticated"
    assert c.cmd("AUTH LOGIN") == "503 5.5.1 Error: already authenticated"


def test_cancelled_auth(auth_relay):
    r = auth_relay()
    c = client(r.port())
    c.ehlo()
    assert c.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert c.cmd("*") == "501 5.7.0 Authentication aborted"
    assert c.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert c.cmd(b64("alice")) == "334 UGFzc3dvcmQ6"
    assert c.cmd("*") == "501 5.7.0 Authentication aborted"
    assert c.cmd("AUTH PLAIN") == "334 "
    assert c.cmd("*") == "501 5.7.0 Authentication aborted"
    assert r.wait_log("warning: unknown[127.0.0.2]: SASL LOGIN authentication aborted")
    # not authenticated: relaying is still refused
    assert c.cmd("MAIL FROM:<a@example.test>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<x@remote.example>") == "554 5.7.1 <x@remote.example>: Relay access denied"


def test_tls_auth_only(auth_relay):
    r = auth_relay("smtpd_tls_auth_only = yes\n")
    c = client(r.port())
    ehlo = c.ehlo()
    assert "STARTTLS" in [l[4:] for l in ehlo]
    assert auth_lines(ehlo) == []
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == \
        "538 5.7.11 Encryption required for requested authentication mechanism"
    c.starttls()
    assert auth_lines(c.ehlo()) == ["AUTH PLAIN LOGIN"]
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "235 2.7.0 Authentication successful"
    assert c.cmd("MAIL FROM:<alice@example.test>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<x@remote.example>") == "250 2.1.5 Ok"


def test_noplaintext_before_tls(auth_relay):
    r = auth_relay("smtpd_sasl_security_options = noanonymous, noplaintext\n"
                   "smtpd_sasl_tls_security_options = noanonymous\n"
                   "broken_sasl_auth_clients = yes\n")
    c = client(r.port())
    assert auth_lines(c.ehlo()) == []
    assert c.cmd("AUTH LOGIN") == "538 5.7.11 Encryption required for requested authentication mechanism"
    c.starttls()
    assert auth_lines(c.ehlo()) == ["AUTH PLAIN LOGIN", "AUTH=PLAIN LOGIN"]
    assert c.cmd("AUTH LOGIN " + b64("alice")) == "334 UGFzc3dvcmQ6"
    assert c.cmd(b64(PASSWORD)) == "235 2.7.0 Authentication successful"


def test_starttls_forgets_authentication(auth_relay):
    r = auth_relay()
    c = client(r.port())
    c.ehlo()
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "235 2.7.0 Authentication successful"
    c.starttls()
    c.ehlo()
    assert c.cmd("MAIL FROM:<alice@example.test>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<x@remote.example>") == "554 5.7.1 <x@remote.example>: Relay access denied"


SUBMISSION = {"smtpd_tls_security_level": "encrypt", "smtpd_sasl_auth_enable": "yes",
              "smtpd_client_restrictions": "permit_sasl_authenticated,reject"}


def test_classic_submission_profile(auth_relay):
    """master.cf as Postfix documents it; SASL is off in main.cf and only the service turns it on."""
    r = auth_relay("smtpd_sasl_auth_enable = no\nsmtpd_sasl_authenticated_header = yes\n",
                   services={"smtp": {}, "submission": SUBMISSION})
    # port 25 stays an MX without AUTH
    c = client(r.port("smtp"))
    assert auth_lines(c.ehlo()) == []
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "503 5.5.1 Error: authentication not enabled"

    c = client(r.port("submission"))
    ehlo = c.ehlo()
    assert auth_lines(ehlo) == []
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "530 5.7.0 Must issue a STARTTLS command first"
    assert c.cmd("MAIL FROM:<alice@example.test>") == "530 5.7.0 Must issue a STARTTLS command first"
    c.starttls()
    assert auth_lines(c.ehlo()) == ["AUTH PLAIN LOGIN"]
    # without AUTH even local mail is refused on submission
    assert c.cmd("MAIL FROM:<alice@example.test>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@example.test>") == \
        "554 5.7.1 <unknown[127.0.0.2]>: Client host rejected: Access denied"
    assert r.wait_log("NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 554 5.7.1 <unknown[127.0.0.2]>: "
                      "Client host rejected: Access denied; from=<alice@example.test> to=<bob@example.test>")
    assert c.cmd("RSET").startswith("250")
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "235 2.7.0 Authentication successful"
    reply = send_message(c, "alice@example.test", ["bob@example.test"])
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    files = r.maildir_files("example.test/bob/")
    assert len(files) == 1
    head = files[0].read_bytes().split(b"\r\n\r\n", 1)[0]
    assert b"\t(Authenticated sender: alice)\r\n" in head
    assert b" with ESMTPSA id " in head
    assert send_message(c, "alice@example.test", ["x@remote.example"]).startswith("250 2.0.0 Ok: queued as ")


def test_sasl_local_domain(auth_relay):
    r = auth_relay("smtpd_sasl_local_domain = example.test\n",
                   users={"alice@example.test": PASSWORD, "bob": PASSWORD})
    c = client(r.port())
    c.ehlo()
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "235 2.7.0 Authentication successful"
    assert c.cmd("MAIL FROM:<alice@example.test>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@example.test>") == "250 2.1.5 Ok"
    assert r.wait_log("sasl_username=alice@example.test")
    c = client(r.port())
    c.ehlo()
    # "bob" becomes bob@example.test, which the file does not know
    assert c.cmd("AUTH PLAIN " + plain("bob", PASSWORD)).startswith("535 5.7.8")


def test_sender_login_mismatch(auth_relay, tmp_path):
    (tmp_path / "logins").write_text("alice@example.test alice\nbob@example.test bob\n@shared.example alice, bob\n")
    r = auth_relay(f"smtpd_sender_login_maps = texthash:{tmp_path}/logins\n"
                   "smtpd_sender_restrictions = reject_sender_login_mismatch\n")
    c = client(r.port())
    c.ehlo()
    # not logged in, but using an owned address
    assert c.cmd("MAIL FROM:<alice@example.test>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@example.test>") == \
        "553 5.7.1 <alice@example.test>: Sender address rejected: not logged in"
    assert c.cmd("RSET").startswith("250")
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "235 2.7.0 Authentication successful"
    assert c.cmd("MAIL FROM:<bob@example.test>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@example.test>") == \
        "553 5.7.1 <bob@example.test>: Sender address rejected: not owned by user alice"
    assert r.wait_log("NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 553 5.7.1 <bob@example.test>: Sender address "
                      "rejected: not owned by user alice; from=<bob@example.test> to=<bob@example.test>")
    assert c.cmd("RSET").startswith("250")
    assert send_message(c, "alice@example.test", ["bob@example.test"]).startswith("250 2.0.0 Ok: queued as")
    assert send_message(c, "team@shared.example", ["bob@example.test"]).startswith("250 2.0.0 Ok: queued as")
    assert len(r.maildir_files("example.test/bob/")) == 2


def test_sasl_config_errors(tmp_path):
    from conftest import BIN
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "main.cf").write_text("smtpd_sasl_auth_enable = yes\n")
    out = subprocess.run([BIN, "check-config", "-c", str(d)], capture_output=True, text=True)
    assert out.returncode == 78
    assert "ktrelay_sasl_password_file is empty" in out.stderr
    (d / "main.cf").write_text(f"smtpd_sasl_auth_enable = yes\nktrelay_sasl_password_file = {d}/none\n")
    out = subprocess.run([BIN, "check-config", "-c", str(d)], capture_output=True, text=True)
    assert out.returncode == 78 and "No such file" in out.stderr
    (d / "main.cf").write_text("smtpd_sasl_security_options = noanonymous, nosuch\n")
    out = subprocess.run([BIN, "check-config", "-c", str(d)], capture_output=True, text=True)
    assert out.returncode == 78 and 'bad value "nosuch" for smtpd_sasl_security_options' in out.stderr


# ---- Dovecot ----

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"


@pytest.fixture
def dovecot_auth():
    """A private Dovecot with only its auth service; yields the auth socket path. Dovecot's
    processes need a directory they can traverse, so pytest's private tmp_path is not used."""
    if os.geteuid() != 0 or not os.path.exists(DOVECOT):
        pytest.skip("needs root and dovecot")
    d = pathlib.Path(tempfile.mkdtemp(prefix="ktrelay-dovecot-auth-"))
    d.chmod(0o755)
    h = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=PASSWORD, capture_output=True, text=True,
                       check=True).stdout.strip()
    (d / "users").write_text(f"alice@example.test:{{SHA512-CRYPT}}{h}\ncarol:{{PLAIN}}plain-pw\n")
    (d / "users").chmod(0o644)
    sock = d / "auth"
    (d / "dovecot.conf").write_text(f"""\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols =
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth {{
  unix_listener {sock} {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
""")
    proc = subprocess.Popen([DOVECOT, "-F", "-c", str(d / "dovecot.conf")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 15
    while not sock.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("dovecot did not start: " + proc.stdout.read().decode())
        time.sleep(0.1)
    try:
        yield sock
    finally:
        stop_process(proc)
        shutil.rmtree(d, ignore_errors=True)


def test_dovecot_backend(auth_relay, dovecot_auth):
    r = auth_relay(f"smtpd_sasl_type = dovecot\nsmtpd_sasl_path = {dovecot_auth}\n")
    c = client(r.port())
    assert auth_lines(c.ehlo()) == ["AUTH PLAIN LOGIN"]
    assert c.cmd("AUTH PLAIN " + plain("alice@example.test", "wrong")) == \
        "535 5.7.8 Error: authentication failed: authentication failure"
    assert c.cmd("AUTH LOGIN " + b64("alice@example.test")) == "334 UGFzc3dvcmQ6"
    assert c.cmd(b64(PASSWORD)) == "235 2.7.0 Authentication successful"
    assert c.cmd("MAIL FROM:<alice@example.test>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<x@remote.example>") == "250 2.1.5 Ok"
    assert r.wait_log("sasl_method=LOGIN, sasl_username=alice@example.test")
    # over TLS too (Dovecot is told the connection is secured)
    c = client(r.port())
    c.ehlo()
    c.starttls()
    c.ehlo()
    assert c.cmd("AUTH PLAIN " + plain("carol", "plain-pw")) == "235 2.7.0 Authentication successful"


def test_dovecot_down_is_a_temporary_failure(auth_relay, tmp_path):
    r = auth_relay(f"smtpd_sasl_type = dovecot\nsmtpd_sasl_path = {tmp_path}/no-such-socket\n")
    c = client(r.port())
    c.ehlo()
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == \
        "454 4.7.0 Temporary authentication failure: Dovecot auth server unavailable"
    assert r.wait_log("cannot connect to Dovecot auth socket")
