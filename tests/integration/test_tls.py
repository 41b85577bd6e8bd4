"""TLS on the wire: STARTTLS (security levels may/encrypt/none and their legacy
switches), implicit TLS (smtpd_tls_wrappermode), protocol and cipher
selection, session resumption across workers, RSA + ECDSA certificates and
chains, broken and stalled handshakes, passphrase-protected keys, the TLS
Received: header and the embedded default configuration. Clients are
openssl s_client, swaks and Python's smtplib/ssl."""
import os
import random
import re
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from conftest import (BASE_MAIN_CF, BASE_VMAILBOX, BIN, SmtpConn, after_trace, embedded_default, free_port, make_cert,
                      port_busy)

SENDER = "sender@example.org"
RCPT = "someone@localhost"
CATCHALL = "localhost/catchall/"
MUST_STARTTLS = "530 5.7.0 Must issue a STARTTLS command first"

MAY = {"smtpd_tls_security_level": "may"}
ENCRYPT = {"smtpd_tls_security_level": "encrypt"}
WRAPPER = {"smtpd_tls_wrappermode": "yes"}
SERVICES = {"smtp": MAY, "submission": ENCRYPT, "smtps": WRAPPER}
PORT_KIND = {"smtp": "starttls", "submission": "starttls", "smtps": "wrapper"}


# ---- set-up helpers ----

def ec_cert(tmp_path):
    d = tmp_path / "certs"
    d.mkdir(exist_ok=True)
    if not (d / "ec.pem").exists():
        make_cert(d, "ec", kind="ec")
    return d / "ec.pem", d / "ec.key"


def tls_relay(relay_factory, tmp_path, extra="", services=None):
    cert, key = ec_cert(tmp_path)
    main = f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n" + extra
    return relay_factory(main, services=services or SERVICES)


def client_ctx(version=None, ciphers=None, cafile=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        ctx.load_verify_locations(str(cafile))
        ctx.check_hostname = False
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if version:
        ctx.minimum_version = ctx.maximum_version = version
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def message(marker):
    return f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: {marker}\r\n\r\nbody of {marker}\r\n"


def delivered(relay, marker, box=CATCHALL):
    return [p for p in relay.maildir_files(box) if f"Subject: {marker}\r\n".encode() in p.read_bytes()]


def smtplib_send(port, kind, marker, version=None):
    """One message through smtplib; returns (protocol, cipher) of the session."""
    ctx = client_ctx(version)
    if kind == "wrapper":
        c = smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=20)
    else:
        c = smtplib.SMTP("127.0.0.1", port, timeout=20)
        c.ehlo("client.example")
        assert c.has_extn("starttls")
        code, _ = c.starttls(context=ctx)
        assert code == 220
    with c:
        c.ehlo("client.example")
        assert not c.has_extn("starttls")
        info = (c.sock.version(), c.sock.cipher()[0])
        refused = c.sendmail(SENDER, [RCPT], message(marker))
        assert refused == {}
    return info


def s_client(port, *args, starttls=True, stdin="", timeout=30):
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof", *args]
    if starttls:
        cmd += ["-starttls", "smtp"]
    r = subprocess.run(cmd, input=stdin.encode(), capture_output=True, timeout=timeout)
    return r.returncode, r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")


def session_line(out):
    """('New'|'Reused', protocol, cipher) of an s_client session. The summary
    line names the cipher's own version, so the protocol comes from the
    session block."""
    m = re.search(r"^(New|Reused), TLSv[\d.]+, Cipher is (\S+)", out, re.M)
    p = re.search(r"^\s+Protocol\s+: (\S+)", out, re.M)
    assert m and p, out
    return m.group(1), p.group(1), m.group(2)


def smtp_script(marker):
    return (f"EHLO client.example\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n"
            f"{message(marker)}.\r\nQUIT\r\n")


def client_hello():
    """The first flight of a real TLS client, to send in pieces."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ctx().wrap_bio(inc, out, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = out.read()
    assert hello[0] == 0x16 and len(hello) > 100
    return hello


def tls12_cipher_names():
    """Every TLS <= 1.2 suite this OpenSSL knows, including the weak ones."""
    out = subprocess.run(["openssl", "ciphers", "ALL:COMPLEMENTOFALL:@SECLEVEL=0"], check=True,
                         capture_output=True, text=True).stdout.strip()
    return [c for c in out.split(":") if not c.startswith("TLS_")]


def openssl_cipher_set(spec):
    r = subprocess.run(["openssl", "ciphers", spec], capture_output=True, text=True)
    if r.returncode != 0:
        return set()
    return {c for c in r.stdout.strip().split(":") if c and not c.startswith("TLS_")}


def accepted_tls12_ciphers(port, names):
    """Handshake once per suite (TLS 1.2, implicit TLS) and keep those that work."""
    ok = set()
    for name in names:
        try:
            ctx = client_ctx(ssl.TLSVersion.TLSv1_2, ciphers=name + ":@SECLEVEL=0")
        except ssl.SSLError:
            continue    # this client cannot offer it at all
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with ctx.wrap_socket(raw) as t:
                    assert t.cipher()[0] == name
                    ok.add(name)
        except (ssl.SSLError, ConnectionResetError):
            pass
    return ok


# ---- delivery through every client, TLS 1.2 and 1.3 ----

@pytest.mark.parametrize("label", ["smtp", "submission", "smtps"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_smtplib_starttls_and_smtp_ssl(relay_factory, tmp_path, label, version):
    r = tls_relay(relay_factory, tmp_path)
    marker = f"smtplib-{label}-{version.name}"
    proto, cipher = smtplib_send(r.port(label), PORT_KIND[label], marker, version)
    assert proto == version.name.replace("_", ".")
    assert len(delivered(r, marker)) == 1
    assert re.search(rf"TLS connection established from unknown\[127\.0\.0\.1\]: {re.escape(proto)} "
                     rf"with cipher {re.escape(cipher)} .*resumed=no", r.log()), r.log()


@pytest.mark.parametrize("label", ["smtp", "smtps"])
@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
def test_s_client_delivery(relay_factory, tmp_path, label, flag):
    r = tls_relay(relay_factory, tmp_path)
    marker = f"s_client-{label}{flag}"
    rc, out = s_client(r.port(label), flag, starttls=label == "smtp", stdin=smtp_script(marker))
    assert rc == 0, out
    assert session_line(out)[1] == ("TLSv1.2" if flag == "-tls1_2" else "TLSv1.3")
    assert "250 2.0.0 Ok: queued as" in out and "221 2.0.0 Bye" in out, out
    assert len(delivered(r, marker)) == 1


@pytest.mark.parametrize("mode,label", [("--tls", "smtp"), ("--tls", "submission"), ("--tlsc", "smtps")])
@pytest.mark.parametrize("proto", ["tlsv1_2", "tlsv1_3"])
def test_swaks(relay_factory, tmp_path, mode, label, proto):
    r = tls_relay(relay_factory, tmp_path)
    marker = f"swaks{mode}-{label}-{proto}"
    p = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(r.port(label)), mode,
                        "--tls-protocol", proto, "--from", SENDER, "--to", RCPT, "--helo", "client.example",
                        "--header", f"Subject: {marker}", "--body", "swaks body", "--timeout", "20"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    want = "TLSv1.2" if proto == "tlsv1_2" else "TLSv1.3"
    assert f"TLS started with cipher {want}:" in p.stdout, p.stdout
    assert len(delivered(r, marker)) == 1


# ---- ciphers ----

def test_cipher_grades_select_their_lists(relay_factory, tmp_path):
    r = tls_relay(relay_factory, tmp_path,
                  "tls_high_cipherlist = ECDHE+AESGCM+AES256\ntls_medium_cipherlist = ECDHE+CHACHA20\n",
                  services={"high": {**WRAPPER, "smtpd_tls_ciphers": "high"},
                            "medium": {**WRAPPER, "smtpd_tls_ciphers": "medium"},
                            "enc": {**ENCRYPT, "smtpd_tls_ciphers": "medium",
                                    "smtpd_tls_mandatory_ciphers": "high"}})
    names = ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-ECDSA-AES128-GCM-SHA256"]
    assert accepted_tls12_ciphers(r.port("high"), names) == {"ECDHE-ECDSA-AES256-GCM-SHA384"}
    assert accepted_tls12_ciphers(r.port("medium"), names) == {"ECDHE-ECDSA-CHACHA20-POLY1305"}
    # level encrypt takes smtpd_tls_mandatory_ciphers, as in Postfix
    for name, works in [(names[0], True), (names[1], False)]:
        c = SmtpConn(r.port("enc"))
        c.cmd_lines("EHLO client.example")
        if works:
            c.starttls(client_ctx(ssl.TLSVersion.TLSv1_2, name))
            assert c.sock.cipher()[0] == name
        else:
            with pytest.raises(ssl.SSLError):
                c.starttls(client_ctx(ssl.TLSVersion.TLSv1_2, name))
        c.close()


def test_default_grade_lists_negotiate_exactly_openssl_sets(relay_factory, tmp_path):
    """With the default lists, the TLS 1.2 suites the server accepts (EC
    certificate) are exactly HIGH (resp. HIGH+MEDIUM) with ECDSA
    authentication: nothing anonymous, nothing weaker."""
    r = tls_relay(relay_factory, tmp_path, services={
        "high": {**WRAPPER, "smtpd_tls_ciphers": "high"},
        "medium": {**WRAPPER, "smtpd_tls_ciphers": "medium"}})
    names = tls12_cipher_names()
    high = accepted_tls12_ciphers(r.port("high"), names)
    medium = accepted_tls12_ciphers(r.port("medium"), names)
    assert high and high == openssl_cipher_set("HIGH+aECDSA")
    assert medium == openssl_cipher_set("HIGH+aECDSA") | openssl_cipher_set("MEDIUM+aECDSA")
    medium_only = openssl_cipher_set("MEDIUM:!HIGH:@SECLEVEL=0")
    if medium_only:
        # a suite only the medium grade allows must be refused under high
        assert not (high & medium_only)
    assert not any("NULL" in c or "RC4" in c or "DES" in c or "EXP" in c for c in high | medium)
    # TLS 1.3 suites are not governed by the grade lists
    for port in (r.port("high"), r.port("medium")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx(ssl.TLSVersion.TLSv1_3).wrap_socket(raw) as t:
                assert t.version() == "TLSv1.3"


def test_exclude_ciphers(relay_factory, tmp_path):
    r = tls_relay(relay_factory, tmp_path, "smtpd_tls_ciphers = high\n", services={
        "plain": WRAPPER,
        "excl": {**WRAPPER, "smtpd_tls_exclude_ciphers": "AES256,CHACHA20"}})
    names = sorted(openssl_cipher_set("HIGH+aECDSA"))
    assert accepted_tls12_ciphers(r.port("plain"), names) == set(names)
    excl = accepted_tls12_ciphers(r.port("excl"), names)
    assert excl and excl == openssl_cipher_set("HIGH+aECDSA:!AES256:!CHACHA20")
    assert "ECDHE-ECDSA-AES256-GCM-SHA384" not in excl and "ECDHE-ECDSA-AES128-GCM-SHA256" in excl
    rc, out = s_client(r.port("excl"), "-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384", starttls=False)
    assert rc != 0 and "handshake failure" in out, out


# ---- protocols ----

def test_tls11_refused(relay_factory, tmp_path):
    """TLS 1.1 needs security level 0 on both ends in OpenSSL 3; the control
    service (>=TLSv1) proves the client really can do TLS 1.1 here."""
    r = tls_relay(relay_factory, tmp_path,
                  "smtpd_tls_protocols = !SSLv2, !SSLv3, !TLSv1, !TLSv1.1\n"
                  "tls_medium_cipherlist = aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH:@SECLEVEL=0\n",
                  services={"legacy": MAY, "ge12": {**MAY, "smtpd_tls_protocols": ">=TLSv1.2"},
                            "control": {**MAY, "smtpd_tls_protocols": ">=TLSv1"},
                            "wrap": {**WRAPPER, "smtpd_tls_protocols": ">=TLSv1.2"},
                            # level encrypt takes smtpd_tls_mandatory_protocols
                            "enc": {**ENCRYPT, "smtpd_tls_protocols": ">=TLSv1",
                                    "smtpd_tls_mandatory_protocols": ">=TLSv1.2"}})
    tls11 = ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]
    rc, out = s_client(r.port("control"), *tls11, stdin="QUIT\r\n")
    assert rc == 0 and session_line(out)[1] == "TLSv1.1", out
    for label in ("legacy", "ge12", "wrap", "enc"):
        rc, out = s_client(r.port(label), *tls11, starttls=label != "wrap", stdin="QUIT\r\n")
        assert rc != 0, f"{label}: {out}"
        assert "Cipher is (NONE)" in out or "no protocols available" in out or "alert" in out, out
        rc, out = s_client(r.port(label), "-tls1_2", starttls=label != "wrap", stdin="QUIT\r\n")
        assert rc == 0 and session_line(out)[1] == "TLSv1.2", out
    assert r.wait_log("SSL_accept error")


# ---- security levels ----

def test_encrypt_requires_starttls(relay_factory, tmp_path):
    r = tls_relay(relay_factory, tmp_path)
    c = SmtpConn(r.port("submission"))
    assert c.banner.startswith("220 ")
    ehlo = c.cmd_lines("EHLO client.example")
    assert "250-STARTTLS" in ehlo
    assert c.cmd_lines(f"MAIL FROM:<{SENDER}>") == [MUST_STARTTLS]
    assert c.cmd_lines(f"RCPT TO:<{RCPT}>") == [MUST_STARTTLS]
    assert c.cmd_lines("DATA") == [MUST_STARTTLS]
    c.send("BDAT 5 LAST\r\nhello")
    assert c.reply_lines() == [MUST_STARTTLS]
    # no SASL here: the TLS requirement is checked first, as in Postfix
    assert c.cmd_lines("AUTH PLAIN AHVzZXIAcGFzcw==") == [MUST_STARTTLS]
    assert c.cmd_lines(f"VRFY <{RCPT}>") == [MUST_STARTTLS]
    assert c.cmd_lines("NOOP") == ["250 2.0.0 Ok"]
    c.starttls()
    c.cmd_lines("EHLO client.example")
    assert c.cmd_lines(f"MAIL FROM:<{SENDER}>") == ["250 2.1.0 Ok"]
    assert c.cmd_lines(f"RCPT TO:<{RCPT}>") == ["250 2.1.5 Ok"]
    assert c.cmd_lines("DATA")[0].startswith("354")
    reply = c.cmd_lines(message("after-starttls") + ".")
    assert reply[0].startswith("250 2.0.0 Ok: queued as"), reply
    assert c.cmd_lines("QUIT") == ["221 2.0.0 Bye"]
    c.close()
    assert len(delivered(r, "after-starttls")) == 1


def test_vrfy_needs_starttls_under_encrypt(relay_factory, tmp_path):
    """VRFY tells which addresses exist: on an encrypt service it waits for TLS like MAIL does."""
    r = tls_relay(relay_factory, tmp_path)
    c = SmtpConn(r.port("submission"))
    assert c.banner.startswith("220 ")
    assert c.cmd_lines(f"VRFY <{RCPT}>") == [MUST_STARTTLS]           # before EHLO too
    assert "250-VRFY" in c.cmd_lines("EHLO client.example")
    assert c.cmd_lines(f"VRFY <{RCPT}>") == [MUST_STARTTLS]
    assert c.cmd_lines("VRFY nobody@remote.example") == [MUST_STARTTLS]
    c.starttls()
    assert c.cmd_lines(f"VRFY <{RCPT}>") == [f"252 2.0.0 {RCPT}"]
    assert c.cmd_lines("VRFY nobody@remote.example") == ["554 5.7.1 <nobody@remote.example>: Relay access denied"]
    assert c.cmd_lines("QUIT") == ["221 2.0.0 Bye"]
    c.close()
    # a service where TLS is optional answers at once
    c = SmtpConn(r.port("smtp"))
    assert c.cmd_lines(f"VRFY <{RCPT}>") == [f"252 2.0.0 {RCPT}"]
    c.close()
    assert r.wait_log("disconnect from unknown[127.0.0.1] ehlo=1 starttls=1 vrfy=5 quit=1 commands=8"), r.log()


@pytest.mark.parametrize("setting,encrypt", [("smtpd_enforce_tls = yes", True), ("smtpd_use_tls = yes", False)])
def test_legacy_switches(relay_factory, tmp_path, setting, encrypt):
    r = tls_relay(relay_factory, tmp_path, setting + "\n", services={"smtp": {}})
    c = SmtpConn(r.port())
    assert "250-STARTTLS" in c.cmd_lines("EHLO client.example")
    mail = c.cmd_lines(f"MAIL FROM:<{SENDER}>")
    assert mail == ([MUST_STARTTLS] if encrypt else ["250 2.1.0 Ok"])
    c.cmd_lines("RSET")
    c.starttls()
    c.cmd_lines("EHLO client.example")
    assert c.cmd_lines(f"MAIL FROM:<{SENDER}>") == ["250 2.1.0 Ok"]
    c.close()


@pytest.mark.parametrize("extra", ["smtpd_tls_security_level = none\n", "", "smtpd_use_tls = yes\n"
                                   "smtpd_tls_security_level = none\n"])
def test_level_none_no_starttls(relay_factory, tmp_path, extra):
    r = tls_relay(relay_factory, tmp_path, extra, services={"smtp": {}})
    c = SmtpConn(r.port())
    ehlo = c.cmd_lines("EHLO client.example")
    assert ehlo[0] == "250-mx.example.test" and not any("STARTTLS" in ln for ln in ehlo)
    assert c.cmd_lines("STARTTLS")[0].startswith("502 ")
    # still a working plaintext session
    assert c.cmd_lines(f"MAIL FROM:<{SENDER}>") == ["250 2.1.0 Ok"]
    c.close()


# ---- STARTTLS details ----

def test_starttls_injection_is_discarded(relay_factory, tmp_path):
    """CVE-2011-0411: plaintext pipelined behind STARTTLS must not be
    answered inside the TLS session."""
    r = tls_relay(relay_factory, tmp_path)
    c = SmtpConn(r.port("smtp"))
    c.cmd_lines("EHLO client.example")
    c.send("STARTTLS\r\nRSET\r\n")
    assert c.reply_lines() == ["220 2.0.0 Ready to start TLS"]
    c.sock = client_ctx().wrap_socket(c.sock)
    assert c.buf == b""
    # the first thing read inside TLS is the answer to what was sent inside TLS
    c.send("HELP\r\n")
    first = c.reply_lines()
    assert first[0].startswith("214 "), first
    assert c.cmd_lines("NOOP") == ["250 2.0.0 Ok"]
    c.close()
    assert r.wait_log("improper command pipelining after STARTTLS"), r.log()
    assert "rset=" not in r.log()


def test_starttls_state_reset_and_no_second_starttls(relay_factory, tmp_path):
    r = tls_relay(relay_factory, tmp_path, "smtpd_helo_required = yes\n")
    c = SmtpConn(r.port("smtp"))
    assert "250-STARTTLS" in c.cmd_lines("EHLO client.example")
    assert c.cmd_lines("STARTTLS now") == ["501 5.5.4 Syntax: STARTTLS"]
    c.starttls()
    # RFC 3207: the EHLO from before the handshake is forgotten (smtpd_helo_required shows it)
    assert c.cmd_lines(f"MAIL FROM:<{SENDER}>") == ["503 5.5.1 Error: send HELO/EHLO first"]
    ehlo = c.cmd_lines("EHLO client.example")
    assert ehlo[0] == "250-mx.example.test" and not any("STARTTLS" in ln for ln in ehlo), ehlo
    second = c.cmd_lines("STARTTLS")
    assert second[0].startswith("554 5.5.1"), second
    assert c.cmd_lines(f"MAIL FROM:<{SENDER}>") == ["250 2.1.0 Ok"]
    c.close()


def test_wrappermode_ehlo_has_no_starttls(relay_factory, tmp_path):
    r = tls_relay(relay_factory, tmp_path)
    c = SmtpConn(r.port("smtps"), tls=client_ctx())
    assert c.banner.startswith("220 ")
    ehlo = c.cmd_lines("EHLO client.example")
    assert ehlo[0] == "250-mx.example.test" and not any("STARTTLS" in ln for ln in ehlo), ehlo
    assert c.cmd_lines("STARTTLS")[0].startswith("554 5.5.1")
    c.close()


def test_quit_reply_then_close_notify(relay_factory, tmp_path):
    """After QUIT over TLS the 221, the close_notify and the end of the stream come together: the client
    reads the reply and then a clean TLS end (no ragged EOF), also with more commands sent after QUIT."""
    r = tls_relay(relay_factory, tmp_path)
    for trailing in (b"", b"NOOP\r\n" * 3000):
        c = SmtpConn(r.port())
        c.ehlo()
        c.starttls()
        c.ehlo()
        c.send(b"QUIT\r\n" + trailing)
        assert c.reply() == "221 2.0.0 Bye"
        assert c.buf == b""
        assert c.sock.recv(100) == b""    # close_notify; a bare FIN raises SSLEOFError here
        c.close()


# ---- resumption ----

@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("label", ["smtp", "smtps"])
def test_resumption_across_workers(relay_factory, tmp_path, flag, label):
    r = tls_relay(relay_factory, tmp_path)
    sess = tmp_path / f"sess{flag}.pem"
    starttls = label == "smtp"
    rc, out = s_client(r.port(label), flag, "-sess_out", str(sess), starttls=starttls,
                       stdin="EHLO client.example\r\nQUIT\r\n")
    assert rc == 0 and session_line(out)[0] == "New", out
    assert sess.exists() and sess.stat().st_size > 0
    for i in range(10):
        rc, out = s_client(r.port(label), flag, "-sess_in", str(sess), starttls=starttls,
                           stdin="EHLO client.example\r\nQUIT\r\n")
        assert rc == 0, out
        assert session_line(out)[0] == "Reused", f"connection {i}: {out}"
    assert r.wait_log("disconnect from", timeout=5)
    deadline = time.time() + 5
    while r.log().count("resumed=yes") < 10 and time.time() < deadline:
        time.sleep(0.05)
    assert r.log().count("resumed=yes") == 10, r.log()
    assert r.log().count("resumed=no") == 1


# ---- broken and stalled handshakes ----

@pytest.mark.parametrize("label", ["smtp", "smtps"])
def test_garbage_handshake(relay_factory, tmp_path, label):
    r = tls_relay(relay_factory, tmp_path)
    rng = random.Random(20110411)
    for junk in (rng.randbytes(700), b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\x05" + rng.randbytes(64)):
        c = SmtpConn(r.port(label), greeting=label == "smtp")
        if label == "smtp":
            c.starttls_raw = c.cmd_lines("STARTTLS")
            assert c.starttls_raw == ["220 2.0.0 Ready to start TLS"]
        c.send(junk)
        assert c.closed(timeout=15, drain=True), f"not closed after {junk[:20]!r}"
        c.close()
    assert r.wait_log("SSL_accept error"), r.log()
    assert r.log().count("SSL_accept error") >= 3, r.log()
    # and it keeps serving
    smtplib_send(r.port(label), PORT_KIND[label], f"after-garbage-{label}")
    assert len(delivered(r, f"after-garbage-{label}")) == 1


@pytest.mark.parametrize("label", ["smtp", "smtps"])
def test_stalled_handshake_times_out_while_others_are_served(relay_factory, tmp_path, label):
    r = tls_relay(relay_factory, tmp_path, "smtpd_starttls_timeout = 2s\n")
    hello = client_hello()
    stalled = SmtpConn(r.port(label), greeting=label == "smtp")
    if label == "smtp":
        stalled.ehlo("client.example")
        assert stalled.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    stalled.send(hello[:len(hello) // 2])
    t0 = time.monotonic()
    for i in range(3):
        smtplib_send(r.port(label), PORT_KIND[label], f"beside-stalled-{label}-{i}")
        assert len(delivered(r, f"beside-stalled-{label}-{i}")) == 1
    assert stalled.closed(timeout=30, drain=True), "stalled handshake never closed"
    # the deadline has one-second resolution: never early by a whole second
    assert time.monotonic() - t0 >= 1.0
    stalled.close()
    assert r.wait_log("timeout after STARTTLS from unknown[127.0.0.1]"), r.log()


# ---- certificates ----

def served_subject(out):
    m = re.search(r"^subject=(.*)$", out, re.M)
    assert m, out
    return m.group(1)


def test_rsa_and_ecdsa_certificates(relay_factory, tmp_path):
    d = tmp_path / "certs"
    d.mkdir()
    rsa, rsa_key = make_cert(d, "rsa", kind="rsa", cn="rsa.example.test")
    ec, ec_key = make_cert(d, "ec", kind="ec", cn="ec.example.test")
    r = relay_factory(f"smtpd_tls_cert_file = {rsa}\nsmtpd_tls_key_file = {rsa_key}\n"
                      f"smtpd_tls_eccert_file = {ec}\nsmtpd_tls_eckey_file = {ec_key}\n",
                      services={"smtp": MAY, "smtps": WRAPPER})
    cases = [
        ([], "ec"),
        (["-tls1_3"], "ec"),
        (["-tls1_2"], "ec"),
        (["-tls1_3", "-sigalgs", "RSA-PSS+SHA256:rsa_pkcs1_sha256"], "rsa"),
        (["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"], "rsa"),
        (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"], "ec"),
    ]
    for label in ("smtp", "smtps"):
        for args, want in cases:
            rc, out = s_client(r.port(label), *args, starttls=label == "smtp", stdin="QUIT\r\n")
            assert rc == 0, out
            assert served_subject(out) == f"CN = {want}.example.test", (label, args, out)


def make_chain(d):
    """root CA -> intermediate CA -> leaf; returns (root, chain file, leaf key)."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("req", "-x509", *ec, "-keyout", str(d / "root.key"), "-out", str(d / "root.pem"), "-days", "30",
        "-subj", "/CN=Test Root", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (d / "ca.ext").write_text("basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n")
    (d / "leaf.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost\n")
    run("req", "-new", *ec, "-keyout", str(d / "int.key"), "-out", str(d / "int.csr"), "-subj", "/CN=Test Int")
    run("x509", "-req", "-in", str(d / "int.csr"), "-CA", str(d / "root.pem"), "-CAkey", str(d / "root.key"),
        "-CAcreateserial", "-out", str(d / "int.pem"), "-days", "30", "-extfile", str(d / "ca.ext"))
    run("req", "-new", *ec, "-keyout", str(d / "leaf.key"), "-out", str(d / "leaf.csr"), "-subj", "/CN=localhost")
    run("x509", "-req", "-in", str(d / "leaf.csr"), "-CA", str(d / "int.pem"), "-CAkey", str(d / "int.key"),
        "-CAcreateserial", "-out", str(d / "leaf.pem"), "-days", "30", "-extfile", str(d / "leaf.ext"))
    chain = d / "chain.pem"
    chain.write_text((d / "leaf.pem").read_text() + (d / "int.pem").read_text())
    return d / "root.pem", chain, d / "leaf.key"


@pytest.mark.parametrize("param", ["smtpd_tls_cert_file", "smtpd_tls_eccert_file"])
def test_full_chain_is_served(relay_factory, tmp_path, param):
    d = tmp_path / "pki"
    d.mkdir()
    root, chain, key = make_chain(d)
    keyparam = "smtpd_tls_key_file" if param == "smtpd_tls_cert_file" else "smtpd_tls_eckey_file"
    r = relay_factory(f"{param} = {chain}\n{keyparam} = {key}\n", services={"smtp": MAY, "smtps": WRAPPER})
    for label in ("smtp", "smtps"):
        rc, out = s_client(r.port(label), "-showcerts", "-CAfile", str(root), "-verify_return_error",
                           starttls=label == "smtp", stdin="QUIT\r\n")
        assert rc == 0, out
        assert out.count("-----BEGIN CERTIFICATE-----") == 2, out
        assert "CN = Test Int" in out
        assert "Verify return code: 0 (ok)" in out, out
    # and a verifying Python client completes the handshake through the intermediate
    c = SmtpConn(r.port("smtps"), tls=client_ctx(cafile=root))
    assert c.banner.startswith("220 ")
    c.close()


def write_conf(d, extra, master):
    d.mkdir(exist_ok=True)
    (d / "vmailbox").write_text(BASE_VMAILBOX)
    (d / "main.cf").write_text(BASE_MAIN_CF.format(dir=d) + extra)
    (d / "master.cf").write_text(master)


@pytest.mark.parametrize("kind,param", [("ec", "smtpd_tls_eccert_file"), ("rsa", "smtpd_tls_cert_file")])
def test_passphrase_protected_key_fails_at_startup(tmp_path, kind, param):
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = make_cert(certs, "enc", kind=kind, passphrase="secret")
    assert "ENCRYPTED" in key.read_text()
    keyparam = param.replace("cert_file", "key_file")
    conf = tmp_path / "conf"
    write_conf(conf, f"smtpd_tls_security_level = may\n{param} = {cert}\n{keyparam} = {key}\n",
               f"127.0.0.1:{free_port()} inet n - n - - smtpd\n")
    chk = subprocess.run([BIN, "check-config", "-c", str(conf)], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL)
    assert chk.returncode != 0
    assert "passphrase" in chk.stderr and str(key) in chk.stderr, chk.stderr
    assert "configuration OK" not in chk.stdout
    run = subprocess.run([BIN, "run", "-c", str(conf)], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL)
    assert run.returncode != 0
    assert "passphrase" in run.stderr, run.stderr
    assert "daemon started" not in run.stderr
    assert "runtime error" not in run.stderr and "AddressSanitizer" not in run.stderr
    # the same configuration with the key decrypted is fine
    plain = certs / "plain.key"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-passin", "pass:secret", "-out", str(plain)], check=True)
    os.replace(plain, key)
    chk = subprocess.run([BIN, "check-config", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert chk.returncode == 0, chk.stderr


# ---- Received: header ----

@pytest.mark.parametrize("setting", ["yes", "no"])
def test_tls_received_header(relay_factory, tmp_path, setting):
    r = tls_relay(relay_factory, tmp_path, f"smtpd_tls_received_header = {setting}\n")
    marker = f"received-{setting}"
    proto, cipher = smtplib_send(r.port("smtp"), "starttls", marker, ssl.TLSVersion.TLSv1_3)
    files = delivered(r, marker)
    assert len(files) == 1
    text = files[0].read_bytes().decode()
    header = text.split("\r\n\r\n", 1)[0]
    received = re.search(r"^Received: .*?(?=\r\n\S)", header, re.S | re.M).group(0)
    assert "with ESMTPS id" in received, received
    if setting == "yes":
        assert f"(using TLSv1.3 with cipher {cipher} (" in received, received
    else:
        assert "using" not in received, received


# ---- the embedded default ----

@pytest.fixture
def default_relay(tmp_path):
    """`ktrelay run` without -c in an empty directory (fixed ports 2525/4465)."""
    if port_busy(2525) or port_busy(4465):
        pytest.skip("ports 2525/4465 are in use")
    with embedded_default(tmp_path) as d:
        yield d / "ktrelay-data"


def test_embedded_default(default_relay):
    data = default_relay
    cert, key = data / "cert.pem", data / "key.pem"
    text = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-text"], check=True,
                          capture_output=True, text=True).stdout
    assert "id-ecPublicKey" in text and ("prime256v1" in text or "P-256" in text), text
    subj = re.search(r"Subject: (.*)", text).group(1).strip()
    issuer = re.search(r"Issuer: (.*)", text).group(1).strip()
    assert subj == issuer == "CN = localhost"
    assert "DNS:localhost" in text
    assert (key.stat().st_mode & 0o077) == 0
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())

    # STARTTLS on 2525, verified against the generated certificate itself
    with smtplib.SMTP("127.0.0.1", 2525, timeout=20) as c:
        c.ehlo("client.example")
        assert c.has_extn("starttls")
        c.starttls(context=client_ctx(cafile=cert))
        assert c.sock.getpeercert(binary_form=True) == der
        c.ehlo("client.example")
        assert c.sendmail(SENDER, [RCPT], message("default-2525")) == {}
    # implicit TLS on 4465
    with smtplib.SMTP_SSL("127.0.0.1", 4465, context=client_ctx(cafile=cert), timeout=20) as c:
        assert c.sock.getpeercert(binary_form=True) == der
        c.ehlo("client.example")
        assert not c.has_extn("starttls")
        assert c.sendmail(SENDER, [RCPT], message("default-4465")) == {}
    box = data / "mail" / "localhost" / "catchall" / "new"
    bodies = [p.read_bytes() for p in box.iterdir()]
    for marker in ("default-2525", "default-4465"):
        assert sum(f"Subject: {marker}\r\n".encode() in b for b in bodies) == 1
    # the default asks for the TLS Received: header
    assert all(b"(using TLSv1.3 with cipher" in b for b in bodies)


# ---- bulk traffic through userspace TLS ----

def big_body(marker, size):
    line = (marker + " 0123456789abcdefghijklmnopqrstuvwxyz.,;:!?-=+ ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n").encode()
    head = f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: {marker}\r\n\r\n".encode()
    body = head + line * (size // len(line))
    return body + b".leading dot\r\n"


@pytest.mark.parametrize("label", ["smtp", "smtps"])
def test_large_messages_data_and_bdat(relay_factory, tmp_path, label):
    """Multi-megabyte bodies, byte-exact, through DATA and BDAT chunks."""
    r = tls_relay(relay_factory, tmp_path)
    c = SmtpConn(r.port(label), tls=client_ctx() if label == "smtps" else None)
    c.cmd_lines("EHLO client.example")
    if label == "smtp":
        c.starttls()
        c.cmd_lines("EHLO client.example")
    data_msg = big_body(f"big-data-{label}", 3 * 1024 * 1024)
    assert c.cmd_lines(f"MAIL FROM:<{SENDER}>") == ["250 2.1.0 Ok"]
    assert c.cmd_lines(f"RCPT TO:<{RCPT}>") == ["250 2.1.5 Ok"]
    assert c.cmd_lines("DATA")[0].startswith("354")
    stuffed = data_msg.replace(b"\r\n.", b"\r\n..")
    c.send(stuffed + b".\r\n")
    assert c.reply_lines()[0].startswith("250 2.0.0 Ok: queued as")
    bdat_msg = big_body(f"big-bdat-{label}", 3 * 1024 * 1024 + 12345)
    assert c.cmd_lines(f"MAIL FROM:<{SENDER}>") == ["250 2.1.0 Ok"]
    assert c.cmd_lines(f"RCPT TO:<{RCPT}>") == ["250 2.1.5 Ok"]
    step = 1000003
    for off in range(0, len(bdat_msg), step):
        chunk = bdat_msg[off:off + step]
        last = off + step >= len(bdat_msg)
        c.send(f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk)
        rep = c.reply_lines()
        assert rep[0].startswith("250 2.0.0 Ok: queued as" if last else "250 2.0.0 Ok: "), rep
    assert c.cmd_lines("QUIT") == ["221 2.0.0 Bye"]
    c.close()
    for marker, msg in ((f"big-data-{label}", data_msg), (f"big-bdat-{label}", bdat_msg)):
        files = delivered(r, marker)
        assert len(files) == 1
        raw = after_trace(files[0].read_bytes())
        assert raw.startswith(b"Received: ")
        assert raw.endswith(msg) and raw.index(msg) == raw.index(b"From: <")


def test_long_pipelined_burst_inside_tls(relay_factory, tmp_path):
    """More pipelined input than the session buffers at once, inside TLS: every
    command is answered, in order. One thread drives both directions (an SSL
    object must not be shared between threads). NOOP and RSET are junk commands: the limit is raised so
    that 50,000 of them are not cut as Postfix would cut them (smtpd_junk_command_limit)."""
    import select
    r = tls_relay(relay_factory, tmp_path, "smtpd_junk_command_limit = 100000\n")
    c = SmtpConn(r.port("smtps"), tls=client_ctx())
    c.cmd_lines("EHLO client.example")
    n = 50000
    out = b"".join(b"NOOP\r\n" if i % 2 else b"RSET\r\n" for i in range(n)) + b"QUIT\r\n"
    got = bytearray()
    c.sock.setblocking(False)
    deadline = time.time() + 120
    while not got.endswith(b"221 2.0.0 Bye\r\n"):
        assert time.time() < deadline, ("stuck", bytes(got[-200:]))
        select.select([c.sock], [c.sock] if out else [], [], 1)
        if out:
            try:
                out = out[c.sock.send(out[:16384]):]
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass
        try:
            while True:
                data = c.sock.recv(65536)
                if not data:
                    assert got.endswith(b"221 2.0.0 Bye\r\n"), ("closed early", bytes(got[-200:]))
                    break
                got += data
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
    lines = bytes(got).split(b"\r\n")
    assert lines[:-2] == [b"250 2.0.0 Ok"] * n and lines[-2:] == [b"221 2.0.0 Bye", b""]
    c.close()
    assert r.wait_log(f"rset={n // 2} noop={n // 2} quit=1"), r.log()[-2000:]


def run_on_tty(command, answer, timeout=30):
    """Run a shell command with a pseudo-terminal as its controlling terminal (openssl asks for a
    passphrase there), typing ANSWER at each prompt. Returns (exit status, what it printed)."""
    import fcntl
    import pty
    import select
    import termios
    master, slave = pty.openpty()

    def make_controlling():
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=slave, stdout=slave, stderr=slave,
                            preexec_fn=make_controlling, close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.time() + timeout
    answered = 0
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 0.2)
        if r:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if out.lower().count(b"pass phrase") > answered:
                answered += 1
                os.write(master, answer.encode() + b"\n")
        elif proc.poll() is not None:
            break
    proc.wait(timeout=5)
    os.close(master)
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.parametrize("combined", [False, True])
def test_passphrase_message_gives_a_command_that_works(tmp_path, combined):
    """The start-up error for an encrypted key prints a command; run as printed (it asks for the
    passphrase on the terminal), it leaves a usable unencrypted key, and the certificate too when
    both share one file."""
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = make_cert(certs, "enc kit", kind="ec", passphrase="secret")   # a space in the name
    if combined:
        both = certs / "both's.pem"                                           # and a quote
        both.write_text(cert.read_text() + key.read_text())
        os.chmod(both, 0o600)
        cert = key = both
    conf = tmp_path / "conf"
    write_conf(conf, f"smtpd_tls_security_level = may\nsmtpd_tls_eccert_file = {cert}\n"
                     f"smtpd_tls_eckey_file = {key}\n", f"127.0.0.1:{free_port()} inet n - n - - smtpd\n")
    for cmd in ("check-config", "run"):
        r = subprocess.run([BIN, cmd, "-c", str(conf)], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 78, r.stderr                  # EX_CONFIG
        m = re.search(r"remove the passphrase with: (.*)$", r.stderr, re.M)
        assert m, r.stderr
    command = m.group(1)
    status, out = run_on_tty(command, "secret")
    assert status == 0, out
    text = key.read_text()
    assert "ENCRYPTED" not in text and "-----BEGIN PRIVATE KEY-----" in text, text
    assert ("-----BEGIN CERTIFICATE-----" in text) == combined
    assert (os.stat(key).st_mode & 0o777) == 0o600
    assert not os.path.exists(str(key) + ".new")
    chk = subprocess.run([BIN, "check-config", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert chk.returncode == 0, chk.stderr
