"""testssl.sh against the embedded default configuration (`ktrelay run`
without -c): its STARTTLS port 2525 and its implicit-TLS port 4465 must offer
nothing below TLS 1.2 and only forward-secret AEAD suites, so no NULL,
anonymous, export, LOW, 3DES/IDEA, RC4 or CBC cipher."""
import json
import shutil
import smtplib
import ssl
import subprocess

import pytest

from conftest import embedded_default, port_busy

TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")
NOT_OFFERED = ["SSLv2", "SSLv3", "TLS1", "TLS1_1", "cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT",
               "cipherlist_LOW", "cipherlist_3DES_IDEA", "cipherlist_AVERAGE"]

pytestmark = pytest.mark.skipif(not TESTSSL, reason="testssl.sh is not installed")


@pytest.fixture(scope="module")
def default_relay(tmp_path_factory):
    """The real embedded default, started like a first-time user would."""
    if port_busy(2525) or port_busy(4465):
        pytest.skip("ports 2525/4465 are in use")
    with embedded_default(tmp_path_factory.mktemp("default")) as d:
        yield d


def run_testssl(tmp_path, port, starttls):
    out = tmp_path / f"testssl-{port}.json"
    cmd = [TESTSSL, "--quiet", "--warnings", "off", "--color", "0", "--nodns", "none",
           "--openssl", "/usr/bin/openssl", "--jsonfile", str(out), "-p", "-s", "-E"]
    if starttls:
        cmd += ["--starttls", "smtp"]
    cmd.append(f"127.0.0.1:{port}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    findings = json.loads(out.read_text())
    assert isinstance(findings, list) and findings, r.stdout[-3000:]
    return {f["id"]: f for f in findings}, r.stdout


def offered_suites(findings, proto):
    """OpenSSL names of the suites testssl found for proto ('tls1_2', 'tls1_3')."""
    names = []
    for fid, f in findings.items():
        if fid.startswith(f"cipher-{proto}_"):
            # "TLS 1.2   xc02c   ECDHE-ECDSA-AES256-GCM-SHA384   ECDH 253 ..."
            names.append(f["finding"].split()[3])
    return names


@pytest.mark.parametrize("port,starttls", [(2525, True), (4465, False)])
def test_testssl_default_configuration(default_relay, tmp_path, port, starttls):
    findings, text = run_testssl(tmp_path, port, starttls)
    if starttls:
        assert findings["service"]["finding"].lower() == "smtp", findings.get("service")
    for fid in NOT_OFFERED:
        assert fid in findings, f"testssl did not report {fid}:\n{text[-3000:]}"
        assert findings[fid]["finding"].startswith("not offered"), (fid, findings[fid])
    assert findings["TLS1_2"]["finding"].startswith("offered"), findings["TLS1_2"]
    assert findings["TLS1_3"]["finding"].startswith("offered"), findings["TLS1_3"]
    assert findings["cipherlist_STRONG"]["finding"].startswith("offered")

    tls12 = offered_suites(findings, "tls1_2")
    tls13 = offered_suites(findings, "tls1_3")
    assert tls12 and tls13, text[-3000:]
    for name in tls12:
        # forward secrecy and an AEAD: nothing CBC, NULL, anonymous or RC4/3DES
        assert name.startswith("ECDHE-") and ("-GCM-" in name or "CHACHA20" in name), name
    assert set(tls13) <= {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256",
                          "TLS_AES_128_CCM_SHA256"}, tls13
    bad = {fid: f for fid, f in findings.items() if f.get("severity") in ("MEDIUM", "HIGH", "CRITICAL")}
    assert not bad, bad

    # the scan left the server healthy
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if starttls:
        c = smtplib.SMTP("127.0.0.1", port, timeout=20)
        c.starttls(context=ctx)
    else:
        c = smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=20)
    with c:
        c.ehlo("client.example")
        assert c.noop()[0] == 250
