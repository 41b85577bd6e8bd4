"""smtp_tls_policy_maps: the outbound TLS policy per next hop, as Postfix reads it. One front ktrelay
relays to next hops the test runs on loopback (Postfix's smtp-sink without STARTTLS, and a second
ktrelay offering STARTTLS on several ports, one per policy), routed by transport_maps and looked up in
the policy table by "[host]:port": encrypt to a plaintext-only hop defers with Postfix's text, none
sends in plaintext although STARTTLS is offered, secure and fingerprint deliver only to the right
certificate, with Postfix's log lines and dsn=4.7.5 otherwise."""
import hashlib
import re
import subprocess

from conftest import make_cert
from test_relay import BODY, nodes, sinks, wait_for  # noqa: F401 (fixtures)

TLS_SERVICE = "smtpd_tls_security_level"


def fingerprints(cert):
    """(certificate digest, public key digest), sha256, as upper-case hex pairs joined by ':'."""
    der = subprocess.run(["openssl", "x509", "-in", str(cert), "-outform", "DER"], capture_output=True,
                         check=True).stdout
    spki = subprocess.run(["sh", "-c", f"openssl x509 -in {cert} -pubkey -noout | openssl pkey -pubin -outform DER"],
                          capture_output=True, check=True).stdout

    def fp(b):
        return ":".join(f"{x:02X}" for x in hashlib.sha256(b).digest())
    return fp(der), fp(spki)


def message(subject):
    return BODY.replace(b"Subject: relay test", b"Subject: " + subject.encode())


def delivered(final, subject):
    """The final node's stored copy of the message with this subject, or None."""
    for f in final.r.maildir_files("localhost/catchall/"):
        data = f.read_bytes()
        if b"Subject: " + subject.encode() + b"\r\n" in data:
            return data
    return None


def test_policy_per_destination(nodes, sinks, tmp_path):
    cert, key = make_cert(tmp_path, cn="mx.secure.test")
    other_cert, _ = make_cert(tmp_path, name="other", cn="mx.secure.test")
    cert_fp, pkey_fp = fingerprints(cert)
    other_fp, _ = fingerprints(other_cert)
    tls = {TLS_SERVICE: "may", "smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(key)}
    labels = ["none", "secure", "wrong", "fp", "fpkey", "fpbad", "may"]
    final = nodes("", services={label: tls for label in labels}).start()
    port = final.r.port
    sink = sinks().start()

    front_dir = tmp_path / "front"
    front_dir.mkdir()
    (front_dir / "transport").write_text(
        f"enc@localhost smtp:[127.0.0.1]:{sink.port}\n"
        + "".join(f"{label}@localhost smtp:[127.0.0.1]:{port(label)}\n" for label in labels))
    # keys as Postfix looks them up: the next hop as written, brackets and port included; "may" is not
    # listed and gets smtp_tls_security_level
    (front_dir / "tls_policy").write_text(
        f"[127.0.0.1]:{sink.port}   encrypt\n"
        f"[127.0.0.1]:{port('none')}   none\n"
        f"[127.0.0.1]:{port('secure')}   secure match=mx.secure.test protocols=>=TLSv1.2\n"
        f"[127.0.0.1]:{port('wrong')}   secure match=other.test:.other.test\n"
        f"[127.0.0.1]:{port('fp')}   fingerprint match={other_fp} match={cert_fp}\n"
        f"[127.0.0.1]:{port('fpkey')}   fingerprint match={pkey_fp.lower()}\n"
        f"[127.0.0.1]:{port('fpbad')}   fingerprint match={other_fp}\n")
    front = nodes("virtual_mailbox_domains = example.test\n"
                  f"transport_maps = texthash:{front_dir}/transport\n"
                  f"smtp_tls_policy_maps = texthash:{front_dir}/tls_policy\n"
                  f"smtp_tls_security_level = may\nsmtp_tls_CAfile = {cert}\nsmtp_tls_loglevel = 1\n").start()

    ids = {label: front.sendmail([f"{label}@localhost"], message(label)) for label in ["enc"] + labels}

    def relay(label):
        return rf"127\.0\.0\.1\[127\.0\.0\.1\]:{sink.port if label == 'enc' else port(label)}"

    def sent(label):
        return front.wait_log(rf"{ids[label]}: to=<{label}@localhost>, relay={relay(label)}, .*status=sent")

    def deferred(label, dsn, text):
        return front.wait_log(rf"{ids[label]}: to=<{label}@localhost>, relay=none, .*dsn={dsn}, "
                              rf"status=deferred \({text}\)")

    # encrypt: smtp-sink offers no STARTTLS, so nothing goes out in plaintext
    assert deferred("enc", r"4\.7\.4", rf"TLS is required, but was not offered by host {relay('enc')}"), front.log()
    assert sink.messages() == []

    # none: plaintext although the next hop offers STARTTLS
    assert sent("none"), front.log()
    got = wait_for(lambda: delivered(final, "none"))
    assert got and b" with ESMTP id " in got, got
    assert not re.search(rf"TLS connection established to {relay('none')}", front.log())

    # secure with match=: the certificate's name is the one asked for
    assert sent("secure"), front.log()
    assert re.search(rf"Verified TLS connection established to {relay('secure')}: TLSv1\.[23] with cipher",
                     front.log())
    got = wait_for(lambda: delivered(final, "secure"))
    assert got and b" with ESMTPS id " in got, got

    # secure, another name: Postfix's deferral, nothing delivered
    assert deferred("wrong", r"4\.7\.5", "Server certificate not verified"), front.log()
    assert re.search(rf"server certificate verification failed for {relay('wrong')}: num=62:hostname mismatch",
                     front.log()), front.log()

    # fingerprint: the certificate's digest (among others) or its public key's (any case) delivers
    assert sent("fp"), front.log()
    assert sent("fpkey"), front.log()
    assert re.search(rf"Verified TLS connection established to {relay('fp')}", front.log())
    assert re.search(rf"Verified TLS connection established to {relay('fpkey')}", front.log())
    # another certificate's digest: the handshake completes, the delivery does not
    assert deferred("fpbad", r"4\.7\.5", "Server certificate not verified"), front.log()
    assert re.search(rf"Trusted TLS connection established to {relay('fpbad')}", front.log())

    # not in the table: smtp_tls_security_level = may; the chain verifies with smtp_tls_CAfile but no
    # name was asked for, so "Trusted", as Postfix logs it
    assert sent("may"), front.log()
    assert re.search(rf"Trusted TLS connection established to {relay('may')}", front.log())

    for label in ("wrong", "fpbad"):
        assert delivered(final, label) is None
    assert sorted(f.name for f in front.queue_files()) == sorted([ids["enc"], ids["wrong"], ids["fpbad"]])


def test_main_cf_levels_and_check_config(nodes, tmp_path):
    """The main.cf side: smtp_tls_security_level = secure with smtp_tls_secure_cert_match, and
    smtp_tls_fingerprint_cert_match; check-config reads the policy table's entries."""
    cert, key = make_cert(tmp_path, cn="relay.example.net")
    fp, _ = fingerprints(cert)
    tls = {TLS_SERVICE: "may", "smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(key)}
    final = nodes("", services={"smtp": tls}).start()
    p = final.r.port()
    # secure's default match is nexthop, dot-nexthop: the next hop 127.0.0.1 is not the certificate's name
    front = nodes("virtual_mailbox_domains = example.test\n"
                  f"relayhost = [127.0.0.1]:{p}\nsmtp_tls_security_level = secure\nsmtp_tls_CAfile = {cert}\n").start()
    q1 = front.sendmail(["x@localhost"], message("q1"))
    assert front.wait_log(rf"{q1}: to=<x@localhost>, relay=none, .*dsn=4\.7\.5, status=deferred "
                          r"\(Server certificate not verified\)"), front.log()
    front.stop()
    main_cf = front.d / "main.cf"
    # the same next hop, now with the names Postfix takes: a literal name and .parent
    front.extra += "smtp_tls_secure_cert_match = nexthop, .example.net\n"
    front.start()
    assert front.wait_log(rf"{q1}: to=<x@localhost>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{p}, .*status=sent"), front.log()
    front.stop()
    front.extra += f"smtp_tls_security_level = fingerprint\nsmtp_tls_fingerprint_cert_match = {fp}\n"
    front.start()
    q2 = front.sendmail(["x@localhost"], message("q2"))
    assert front.wait_log(rf"{q2}: to=<x@localhost>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{p}, .*status=sent"), front.log()
    assert main_cf.exists()
