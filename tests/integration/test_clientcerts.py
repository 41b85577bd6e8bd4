"""Client certificates as Postfix's smtpd treats them: the TLS log line says Trusted (the certificate
verifies against smtpd_tls_CAfile), Untrusted or Anonymous; permit_tls_clientcerts permits a client
whose certificate (or public key) fingerprint, in smtpd_tls_fingerprint_digest, is listed in
relay_clientcerts; permit_tls_all_clientcerts permits any client whose certificate verifies."""
import socket
import ssl
import subprocess

import pytest

from conftest import SmtpConn, make_cert


def ca_signed(tmp, name, ca_cert, ca_key):
    key, csr, cert = tmp / f"{name}.key", tmp / f"{name}.csr", tmp / f"{name}.pem"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-days", "30", "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def fingerprint(cert, digest="sha256"):
    out = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint", f"-{digest}"],
                         check=True, capture_output=True, text=True).stdout
    return out.strip().split("=", 1)[1]


def pkey_fingerprint(cert):
    """sha256 of the DER SubjectPublicKeyInfo, as Postfix's public key fingerprint."""
    pub = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-pubkey"], check=True,
                         capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub, check=True,
                         capture_output=True).stdout
    import hashlib
    h = hashlib.sha256(der).hexdigest().upper()
    return ":".join(h[i:i + 2] for i in range(0, len(h), 2))


@pytest.fixture
def certs(tmp_path):
    ca_cert, ca_key = make_cert(tmp_path, "ca", cn="Test CA")
    good, good_key = ca_signed(tmp_path, "client-good", ca_cert, ca_key)
    other, other_key = ca_signed(tmp_path, "client-other", ca_cert, ca_key)
    selfs, selfs_key = make_cert(tmp_path, "client-self", cn="client-self")
    server, server_key = make_cert(tmp_path, "server", cn="mx.example.test")
    return dict(ca=ca_cert, good=(good, good_key), other=(other, other_key), selfsigned=(selfs, selfs_key),
                server=(server, server_key))


def relay_try(relay, client_cert=None):
    """STARTTLS (with the certificate, if any), then RCPT to a remote domain: the relay decision."""
    c = SmtpConn(sock=socket.create_connection(("127.0.0.1", relay.port()), timeout=10))
    assert c.cmd("EHLO client.test").startswith("250")
    assert c.cmd("STARTTLS").startswith("220")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if client_cert:
        ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    c.sock = ctx.wrap_socket(c.sock)
    c.buf = b""
    assert c.cmd("EHLO client.test").startswith("250")
    assert c.cmd("MAIL FROM:<a@example.org>").startswith("250")
    r = c.cmd("RCPT TO:<someone@remote.test>")
    c.close()
    return r


def config(tmp_path, certs, restrictions, extra=""):
    return (f"smtpd_tls_security_level = may\nsmtpd_tls_cert_file = {certs['server'][0]}\n"
            f"smtpd_tls_key_file = {certs['server'][1]}\nsmtpd_tls_ask_ccert = yes\n"
            f"smtpd_tls_CAfile = {certs['ca']}\nqueue_directory = {{dir}}/queue\nrelayhost = [127.0.0.1]:9\n"
            f"smtpd_relay_restrictions = {restrictions}, reject_unauth_destination\n" + extra)


def test_permit_tls_clientcerts(relay_factory, tmp_path, certs):
    listed = tmp_path / "relay_clientcerts"
    # one certificate by its fingerprint, the other by its public key's, lower case like postmap keys
    listed.write_text(f"{fingerprint(certs['good'][0])} good-client\n"
                      f"{pkey_fingerprint(certs['selfsigned'][0]).lower()} pinned-key\n")
    r = relay_factory(config(tmp_path, certs, "permit_tls_clientcerts",
                             f"relay_clientcerts = texthash:{listed}\n"))
    assert relay_try(r, certs["good"]) == "250 2.1.5 Ok"
    # a listed public key permits even an unverified certificate, as in Postfix
    assert relay_try(r, certs["selfsigned"]) == "250 2.1.5 Ok"
    assert relay_try(r, certs["other"]) == "554 5.7.1 <someone@remote.test>: Relay access denied"
    assert relay_try(r) == "554 5.7.1 <someone@remote.test>: Relay access denied"
    log = r.log()
    assert "Trusted TLS connection established from unknown[127.0.0.1]" in log
    assert "Untrusted TLS connection established from unknown[127.0.0.1]" in log
    assert "Anonymous TLS connection established from unknown[127.0.0.1]" in log


def test_permit_tls_all_clientcerts(relay_factory, tmp_path, certs):
    r = relay_factory(config(tmp_path, certs, "permit_tls_all_clientcerts"))
    assert relay_try(r, certs["good"]) == "250 2.1.5 Ok"
    assert relay_try(r, certs["other"]) == "250 2.1.5 Ok"
    assert relay_try(r, certs["selfsigned"]) == "554 5.7.1 <someone@remote.test>: Relay access denied"
    assert relay_try(r) == "554 5.7.1 <someone@remote.test>: Relay access denied"


def test_clientcert_configuration_errors(tmp_path, certs):
    from conftest import BASE_MAIN_CF, BASE_VMAILBOX, BIN
    for extra, what in [("", "permit_tls_clientcerts needs relay_clientcerts"),
                        ("relay_clientcerts = inline:{ AA=x }\nsmtpd_tls_fingerprint_digest = nosuch\n",
                         "smtpd_tls_fingerprint_digest: unknown digest")]:
        (tmp_path / "vmailbox").write_text(BASE_VMAILBOX)
        (tmp_path / "main.cf").write_text(BASE_MAIN_CF.format(dir=tmp_path) +
                                          config(tmp_path, certs, "permit_tls_clientcerts", extra)
                                          .replace("{dir}", str(tmp_path)))
        (tmp_path / "master.cf").write_text("127.0.0.1:1 inet n - n - - smtpd\n")
        p = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True)
        assert p.returncode != 0 and what in p.stdout + p.stderr, p.stdout + p.stderr
