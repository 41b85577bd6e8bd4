"""Kernel TLS on the outbound side: ktrelay A relays through its queue to ktrelay B over STARTTLS
(smtp_tls_security_level = encrypt, transport_maps), on a kernel with the tls ULP (the qemu VM of
tests/vm; run through tests/vm/run-ktls-tests.sh).

A's client must hand its transmit side to the kernel (its log line says ktls=tx), send the bodies
with sendfile(2) from the queue file (BDAT: B offers CHUNKING), and /proc/net/tls_stat must count
A's kernel TX contexts: with kTLS off on B every new TlsTxSw is A's. Both messages (one of 1 MB,
one small, each with lines that start with a dot) must reach B's Maildir byte-exact.

Skipped on a host without the tls ULP.
"""
import re
import subprocess
import time

import pytest

from conftest import BIN, make_cert, after_trace
from test_ktls import _ktls_available, stat_delta, tls_stat

pytestmark = pytest.mark.skipif(not _ktls_available(),
                                reason="no kernel TLS here (tls ULP not loaded); run tests/vm/run-ktls-tests.sh")

TIMEOUT = 180            # TCG emulation is slow

B_CF = """\
smtpd_tls_security_level = may
smtpd_tls_eccert_file = {cert}
smtpd_tls_eckey_file = {key}
message_size_limit = 40000000
tls_ktls_enable = {ktls}
"""

A_CF = """\
queue_directory = {{dir}}/queue
minimal_backoff_time = 1s
maximal_backoff_time = 2s
queue_run_delay = 1s
virtual_mailbox_domains = example.test
transport_maps = inline:{{ localhost=smtp:[127.0.0.1]:{port} }}
smtp_tls_security_level = encrypt
smtp_tls_mandatory_protocols = {protocols}
smtp_tls_loglevel = 1
message_size_limit = 40000000
"""


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("cert"))


# From:, Date: and Message-ID: are there so that sendmail adds no header (as
# Postfix's cleanup, it adds the missing ones) and the bytes can be compared
# end to end.
HEADERS = b"From: alice@example.test\nDate: Mon, 30 Nov 2026 08:00:00 +0000\n"


def big_body():
    lines = [HEADERS + b"Message-ID: <big@example.test>\nSubject: one megabyte through kernel TLS", b"",
             b".a first line with a leading dot"]
    total, i = 0, 0
    while total < 1024 * 1024:
        lines.append(b"%s%07d %s" % (b"." if i % 7 == 0 else b"", i, bytes([65 + i % 26]) * 60))
        total += len(lines[-1]) + 2
        i += 1
    return b"\n".join(lines) + b"\n"


SMALL = HEADERS + b"Message-ID: <small@example.test>\nSubject: small\n\nhello\n.dot\n..two\nend\n"


def sendmail(relay, body):
    p = subprocess.run([BIN, "sendmail", "-v", "-c", str(relay.dir), "-f", "alice@example.test", "bob@localhost"],
                       input=body, capture_output=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    return re.search(rb"([0-9A-F]+): from=", p.stderr).group(1).decode()


def wait(fn, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    return fn()


@pytest.mark.parametrize("b_ktls", ["no", "yes"])
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_relay_client_ktls_sendfile(relay_factory, cert, version, b_ktls):
    b = relay_factory(B_CF.format(cert=cert[0], key=cert[1], ktls=b_ktls))
    a = relay_factory(A_CF.format(port=b.port(), protocols=f">={version}, <={version}"))
    before = tls_stat()
    bodies = [big_body(), SMALL]
    ids = [sendmail(a, body) for body in bodies]
    for qid in ids:
        assert wait(lambda: re.search(rf"{qid}: to=<bob@localhost>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{b.port()}, "
                                      r".*status=sent", a.log())), a.log()[-3000:]
        assert wait(lambda: f"{qid}: removed" in a.log()), a.log()[-3000:]

    # byte-exact after B's Received: header
    files = wait(lambda: len(b.maildir_files()) == 2 and b.maildir_files())
    assert files, b.log()[-3000:]
    contents = [f.read_bytes() for f in files]
    for body in bodies:
        crlf = body.replace(b"\n", b"\r\n")
        match = [c for c in contents if c.endswith(crlf)]
        assert len(match) == 1, f"message of {len(crlf)} bytes not stored byte-exact"
        assert after_trace(match[0]).startswith(b"Received: from ")
    # the bodies went as BDAT chunks
    assert wait(lambda: re.search(r"disconnect from .* bdat=\d", b.log())), b.log()[-3000:]

    # A's outbound TLS connections: the version asked for, transmit side in the kernel
    est = re.findall(rf"TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{b.port()}: (\S+) .* ktls=(\S+)",
                     a.log())
    assert est, a.log()[-3000:]
    assert all(v == version and k == "tx" for v, k in est), est

    # every kernel context is released once A has QUIT and B has closed
    after = wait(lambda: (lambda s: stat_delta(before, s)["TlsCurrTxSw"] <= 0 and s)(tls_stat()), 60)
    d = stat_delta(before, after)
    assert d["TlsCurrTxSw"] == 0, d
    # B's sessions add a TX context each when B has kTLS too
    assert d["TlsTxSw"] == len(est) * (2 if b_ktls == "yes" else 1), (d, est)
    assert d["TlsDecryptError"] == 0, d

    # stop A: its shutdown line counts the bodies that went by sendfile
    assert a.stop() == 0
    log = (a.dir / "ktrelay.log").read_text(errors="replace")
    m = re.search(r"queue manager stopped: (\d+) message bodies sent with sendfile", log)
    assert m and int(m.group(1)) == len(bodies), log[-3000:]
