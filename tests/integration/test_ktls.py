"""Kernel TLS end to end: real TLS clients against ktrelay on a kernel with the
tls ULP (the qemu VM of tests/vm; run through tests/vm/run-ktls-tests.sh).

Every session checks /proc/net/tls_stat: while it is open the kernel must hold
one more software TX context (and RX context where offloaded), and afterwards
TlsTxSw/TlsRxSw must have grown, so a silent fallback to userspace OpenSSL
fails the test. The per-connection log line must say which directions the
kernel took: ktls=tx+rx for TLS 1.2 and for TLS 1.3 with tls_ktls_rx_tls13=yes
(keys installed by ktrelay), ktls=tx with tls_ktls_rx_tls13=no.

Skipped on a host without the tls ULP.
"""
import os
import random
import re
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

from conftest import SmtpConn, make_cert, wait_until, after_trace


def _ktls_available():
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            return "tls" in f.read().split() and os.path.exists("/proc/net/tls_stat")
    except OSError:
        return False


if os.environ.get("KT_KTLS_REQUIRED") == "1" and not _ktls_available():
    raise RuntimeError("KT_KTLS_REQUIRED=1 but this kernel has no TLS ULP (tls_stat missing)")

pytestmark = pytest.mark.skipif(not _ktls_available(),
                                reason="no kernel TLS here (tls ULP not loaded); run tests/vm/run-ktls-tests.sh")

TIMEOUT = int(os.environ.get("KT_KTLS_TIMEOUT", "180"))   # seconds per socket operation: TCG emulation is slow
SOL_TLS = 282
TLS_SET_RECORD_TYPE = 1
SSL_OP_ENABLE_KTLS = 1 << 3   # not exported by Python 3.11's ssl module

TLS12_CIPHERS = ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                 "ECDHE-ECDSA-CHACHA20-POLY1305"]
TLS13_SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]

EXTRA_MAIN_CF = """\
smtpd_tls_security_level = may
smtpd_tls_eccert_file = {cert}
smtpd_tls_eckey_file = {key}
smtpd_tls_protocols = >=TLSv1.2
message_size_limit = 40000000
"""

SERVICES = {
    "smtp": {},
    "smtps": {"smtpd_tls_wrappermode": "yes"},
    "smtp_norx": {"tls_ktls_rx_tls13": "no"},
    "smtps_norx": {"smtpd_tls_wrappermode": "yes", "tls_ktls_rx_tls13": "no"},
}


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture
def krelay(relay_factory, cert):
    return relay_factory(EXTRA_MAIN_CF.format(cert=cert[0], key=cert[1]), services=SERVICES)


# ---- helpers ----

def tls_stat():
    with open("/proc/net/tls_stat") as f:
        return {k: int(v) for k, v in (line.split() for line in f if line.strip())}


def stat_delta(before, after):
    return {k: after[k] - before.get(k, 0) for k in after}


def client_ctx(version, cipher=None, ktls=False):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = version
    ctx.maximum_version = version
    if cipher:
        ctx.set_ciphers(cipher)
    if ktls:
        ctx.options |= SSL_OP_ENABLE_KTLS
    return ctx


TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3


def make_body(size, seed):
    """About `size` bytes of CRLF text with lines that start with dots (so
    stuffing matters) and a trailing CRLF; fast enough for 20 MB under TCG."""
    rnd = random.Random(seed)
    table = bytearray(b"\n" * 4 + b"." * 8)
    printable = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -_=+:;,<>!#$%&*()"
    while len(table) < 256:
        table.append(printable[len(table) % len(printable)])
    raw = rnd.randbytes(size).translate(bytes(table))
    head = b"From: <sender@example.test>\r\nTo: <rcpt@localhost>\r\nSubject: ktls %d\r\n\r\n" % seed
    body = head + raw.replace(b"\n", b"\r\n")
    return body if body.endswith(b"\r\n") else body + b"\r\n"


def dot_stuff(body):
    return (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]


def client(port, mode, ctx, ehlo=True):
    """A TLS session: implicit (mode "smtps") or after STARTTLS, then EHLO inside TLS unless ehlo=False.
    Each send() is one TLS record (up to 16 KiB), so the test controls the record boundaries; an EOF
    without close_notify raises, so recv() == b"" means close_notify."""
    if mode == "smtps":
        c = SmtpConn(port, tls=ctx, timeout=TIMEOUT)
    else:
        c = SmtpConn(port, timeout=TIMEOUT)
        c.ehlo("client.example.test")
        c.starttls(ctx)
    if ehlo:
        assert "250 CHUNKING" in c.ehlo("client.example.test")
    return c


def envelope(c, rcpt="rcpt@localhost"):
    c.cmd("MAIL FROM:<sender@example.test>", 250)
    c.cmd(f"RCPT TO:<{rcpt}>", 250)


def send_data(c, body):
    envelope(c)
    c.cmd("DATA", 354)
    c.send(dot_stuff(body) + b".\r\n")
    return c.expect(250)


def send_bdat(c, body, chunk=None):
    envelope(c)
    chunk = chunk or len(body)
    for off in range(0, len(body), chunk):
        piece = body[off:off + chunk]
        last = b" LAST" if off + chunk >= len(body) else b""
        c.send(b"BDAT %d%s\r\n" % (len(piece), last) + piece)
        reply = c.expect(250)
    return reply


def established_lines(relay):
    return re.findall(r"TLS connection established from unknown\[127\.0\.0\.1\]: (.*)", relay.log())


def wait_established(relay, count):
    deadline = time.time() + 30
    while time.time() < deadline:
        lines = established_lines(relay)
        if len(lines) >= count:
            return lines[count - 1]
        time.sleep(0.05)
    raise AssertionError("no TLS established line:\n" + relay.log()[-3000:])


def wait_disconnects(relay, count, timeout=60):
    """Sessions that sent commands ended (the fixture's start-up probes send none)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(re.findall(r"disconnect from unknown\[127\.0\.0\.1\] .*commands=[1-9]", relay.log())) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"expected {count} disconnect lines:\n" + relay.log()[-3000:])


def assert_delivered(relay, bodies):
    """The mailbox holds exactly these messages, each byte-exact after one
    Received: header."""
    files = relay.maildir_files()
    assert len(files) == len(bodies), (files, relay.log()[-3000:])
    contents = [f.read_bytes() for f in files]
    for body in bodies:
        match = [c for c in contents if c.endswith(body)]
        assert len(match) == 1, f"message of {len(body)} bytes not stored byte-exact"
        header = after_trace(match[0][:-len(body)])
        assert re.fullmatch(rb"Received: from [^\r\n]*\r\n(\t[^\r\n]*\r\n)+", header), header
    for f in files:
        assert int(re.search(r",S=(\d+)", f.name).group(1)) == f.stat().st_size
    assert relay.maildir_files(sub="tmp") == []


def assert_nothing_delivered(relay):
    assert relay.maildir_files() == [], relay.log()[-3000:]
    # the abandoned spool file is removed once its operations complete
    deadline = time.time() + 15
    while relay.maildir_files(sub="tmp") and time.time() < deadline:
        time.sleep(0.05)
    assert relay.maildir_files(sub="tmp") == [], "spool file left in tmp/"


def check_ktls_stats(before, during, after, rx, tx=1):
    """Kernel contexts the server's session held (the Python and openssl
    clients do not enable kTLS, so every context counted is the server's)."""
    d_open = stat_delta(before, during)
    d_total = stat_delta(before, after)
    assert d_open["TlsCurrTxSw"] == tx, f"kernel TX contexts while open: {d_open}"
    assert d_open["TlsCurrRxSw"] == rx, f"kernel RX contexts while open: {d_open}"
    assert d_total["TlsTxSw"] == tx, f"TlsTxSw did not grow: {d_total}"
    assert d_total["TlsRxSw"] == rx, f"TlsRxSw did not grow as expected: {d_total}"
    assert d_total["TlsDecryptError"] == 0, d_total
    assert stat_delta(before, after)["TlsCurrTxSw"] == 0, "kernel TX context not released at close"
    assert stat_delta(before, after)["TlsCurrRxSw"] == 0, "kernel RX context not released at close"


def wait_stat_settled(before, timeout=30):
    """Contexts are released when the server closes the socket, a moment
    after the client saw its last reply."""
    deadline = time.time() + timeout
    while True:
        now = tls_stat()
        d = stat_delta(before, now)
        if (d["TlsCurrTxSw"] <= 0 and d["TlsCurrRxSw"] <= 0) or time.time() > deadline:
            return now
        time.sleep(0.05)


# ---- TLS 1.2: every AEAD suite the kernel offloads, both directions ----

@pytest.mark.parametrize("mode", ["starttls", "smtps"])
@pytest.mark.parametrize("cipher", TLS12_CIPHERS)
def test_tls12_ktls_data_and_bdat(krelay, cipher, mode):
    port = krelay.port("smtp" if mode == "starttls" else "smtps")
    before = tls_stat()
    c = client(port, mode, client_ctx(TLS12, cipher))
    during = tls_stat()
    small = make_body(3000, 1)
    big = make_body(1 << 20, 2)
    send_data(c, small)
    send_bdat(c, big, chunk=300000)
    c.quit()
    after = wait_stat_settled(before)
    line = wait_established(krelay, 1)
    assert line.startswith(f"TLSv1.2 with cipher {cipher} "), line
    assert line.endswith("ktls=tx+rx"), line
    check_ktls_stats(before, during, after, rx=1)
    wait_disconnects(krelay, 1)
    assert_delivered(krelay, [small, big])
    assert "commands=" in krelay.log()


# ---- TLS 1.3 through openssl s_client, which can pick the suite ----

def s_client(port, mode, suite, script, timeout=TIMEOUT):
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-ciphersuites", suite,
           "-ign_eof", "-no_ticket"]
    if mode == "starttls":
        cmd += ["-starttls", "smtp"]
    p = subprocess.run(cmd, input=script, capture_output=True, timeout=timeout)
    return p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def session_script(messages):
    """EHLO, then for each (method, body) a pipelined transaction, then QUIT."""
    out = b"EHLO client.example.test\r\n"
    for method, body in messages:
        out += b"MAIL FROM:<sender@example.test>\r\nRCPT TO:<rcpt@localhost>\r\n"
        if method == "data":
            out += b"DATA\r\n" + dot_stuff(body) + b".\r\n"
        else:
            out += b"BDAT %d LAST\r\n" % len(body) + body
    return out + b"QUIT\r\n"


# every suite with own-key RX on both ports and without it on one; one SMTPS session without RX is enough
TLS13_CASES = ([(suite, mode, True) for suite in TLS13_SUITES for mode in ("smtps", "starttls")]
               + [(suite, "starttls", False) for suite in TLS13_SUITES] + [(TLS13_SUITES[0], "smtps", False)])


@pytest.mark.parametrize("suite,mode,rx", TLS13_CASES)
def test_tls13_suites(krelay, suite, mode, rx):
    label = ("smtp" if mode == "starttls" else "smtps") + ("" if rx else "_norx")
    seed = TLS13_SUITES.index(suite) * 10
    bodies = [("data", make_body(1 << 20, seed + 1)), ("bdat", make_body(1 << 20, seed + 2)),
              ("bdat", make_body(5000, seed + 3))]
    before = tls_stat()
    out, err = s_client(krelay.port(label), mode, suite, session_script(bodies))
    after = wait_stat_settled(before)
    assert out.count("250 2.0.0 Ok: queued as") == 3, out[-2000:] + err[-2000:] + krelay.log()[-3000:]
    assert "221 2.0.0 Bye" in out
    line = wait_established(krelay, 1)
    assert line.startswith(f"TLSv1.3 with cipher {suite} "), line
    assert line.endswith("ktls=tx+rx" if rx else "ktls=tx"), line
    d = stat_delta(before, after)
    assert d["TlsTxSw"] == 1, d
    assert d["TlsRxSw"] == (1 if rx else 0), d
    assert d["TlsDecryptError"] == 0, d
    assert d["TlsCurrTxSw"] == 0 and d["TlsCurrRxSw"] == 0, d
    assert_delivered(krelay, [b for _, b in bodies])


@pytest.mark.parametrize("rx", [True, False])
def test_tls13_python_contexts_while_open(krelay, rx):
    """The kernel holds the session's contexts while it runs (own-key RX
    included), and releases them at the end."""
    before = tls_stat()
    c = client(krelay.port("smtps" if rx else "smtps_norx"), "smtps", client_ctx(TLS13))
    during = tls_stat()
    body = make_body(200000, 40)
    send_bdat(c, body, chunk=70000)
    c.quit()
    after = wait_stat_settled(before)
    check_ktls_stats(before, during, after, rx=1 if rx else 0)
    assert wait_established(krelay, 1).endswith("ktls=tx+rx" if rx else "ktls=tx")
    assert_delivered(krelay, [body])


# ---- large messages ----

@pytest.mark.parametrize("version,method", [(TLS12, "data"), (TLS13, "bdat")])
def test_20mb(krelay, version, method):
    body = make_body(20 << 20, 50)
    before = tls_stat()
    c = client(krelay.port("smtps"), "smtps", client_ctx(version))
    during = tls_stat()
    if method == "data":
        send_data(c, body)
    else:
        send_bdat(c, body, chunk=8 << 20)
    c.quit()
    after = wait_stat_settled(before)
    check_ktls_stats(before, during, after, rx=1)
    assert_delivered(krelay, [body])


# ---- the client goes away mid-body ----

def ktls_sendmsg(c, rtype, payload):
    """Send one record of type rtype through the client's own kTLS TX."""
    with socket.socket(fileno=os.dup(c.sock.fileno())) as s:
        s.sendmsg([payload], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([rtype]))])


def client_with_ktls(krelay, label, version, mode="smtps"):
    """A client whose own TX is in the kernel, so it can send any record
    type (alerts, KeyUpdate) with sendmsg."""
    before = tls_stat()
    c = client(krelay.port(label), mode, client_ctx(version, ktls=True))
    d = stat_delta(before, tls_stat())
    if d["TlsCurrTxSw"] < 2:
        c.close()
        pytest.fail(f"the client could not get kTLS TX for itself: {d}")
    return c


def start_body(c, method, body, total):
    envelope(c)
    if method == "data":
        c.cmd("DATA", 354)
        c.send(dot_stuff(body))
    else:
        c.send(b"BDAT %d LAST\r\n" % total + body)


def body_started(krelay, c):
    """The server is inside the message: its spool file is open and it has read what was sent."""
    wait_until(lambda: krelay.open_spool_files(), TIMEOUT, "the spool file")
    c.wait_read_by_server(TIMEOUT)


def relay_survives(krelay):
    try:
        c = client(krelay.port("smtp"), "starttls", client_ctx(TLS12))
    except OSError as e:
        raise AssertionError(f"no new session after the broken one ({e}):\n{krelay.threads_state()}") from e
    body = make_body(2000, 99)
    send_data(c, body)
    c.quit()
    return body


@pytest.mark.parametrize("method", ["data", "bdat"])
@pytest.mark.parametrize("label,version,needle", [
    ("smtps", TLS12, "TLS alert from unknown[127.0.0.1]: level 2 description 80"),
    ("smtps", TLS13, "TLS alert from unknown[127.0.0.1]: level 2 description 80"),
    ("smtps_norx", TLS13, "SSL_read error from unknown[127.0.0.1]: "),
])
def test_alert_mid_body(krelay, method, label, version, needle):
    c = client_with_ktls(krelay, label, version)
    start_body(c, method, make_body(100000, 60), 300000)
    body_started(krelay, c)
    ktls_sendmsg(c, 21, bytes([2, 80]))   # fatal internal_error
    assert krelay.wait_log(needle, timeout=30), krelay.log()[-3000:]
    # the server closes the connection
    c.sock.settimeout(30)
    with pytest.raises((EOFError, OSError, ssl.SSLError)):
        while True:
            c.reply()
    c.close()
    wait_disconnects(krelay, 1)
    assert_nothing_delivered(krelay)
    body = relay_survives(krelay)
    assert_delivered(krelay, [body])


@pytest.mark.parametrize("method", ["data", "bdat"])
@pytest.mark.parametrize("label,version", [("smtps", TLS12), ("smtps", TLS13), ("smtps_norx", TLS13)])
def test_reset_mid_body(krelay, method, label, version):
    c = client(krelay.port(label), "smtps", client_ctx(version))
    start_body(c, method, make_body(100000, 61), 300000)
    body_started(krelay, c)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.sock.close()
    wait_disconnects(krelay, 1)
    log = krelay.log()
    assert any(n in log for n in ("Connection reset by peer", "lost connection after")), log[-3000:]
    assert_nothing_delivered(krelay)
    body = relay_survives(krelay)
    assert_delivered(krelay, [body])


# ---- close_notify ----

@pytest.mark.parametrize("label,version", [("smtp", TLS12), ("smtp", TLS13), ("smtp_norx", TLS13)])
def test_close_notify_ends_session(krelay, label, version):
    """The client's close_notify (sent as a raw alert record through its own
    kTLS TX) ends the session: an open transaction is dropped, the server
    answers with its own close_notify and closes."""
    c = client_with_ktls(krelay, label, version, mode="starttls")
    body = make_body(5000, 70)
    send_data(c, body)
    envelope(c)
    ktls_sendmsg(c, 21, bytes([1, 0]))
    c.sock.settimeout(30)
    assert c.sock.recv(100) == b"", "no close_notify from the server"
    c.close()
    assert krelay.wait_log("TLS close_notify from unknown[127.0.0.1]", timeout=30), krelay.log()[-3000:]
    wait_disconnects(krelay, 1)
    assert re.search(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=2 starttls=1 mail=2 rcpt=2 data=1 "
                     r"commands=8", krelay.log()), krelay.log()[-2000:]
    assert_delivered(krelay, [body])


# ---- pipelining and record boundaries ----

@pytest.mark.parametrize("label,version", [("smtps", TLS12), ("smtps", TLS13), ("smtps_norx", TLS13)])
def test_pipelining_across_records(krelay, label, version):
    c = client(krelay.port(label), "smtps", client_ctx(version), ehlo=False)
    # one command split over several records
    for piece in [b"EH", b"LO client.exa", b"mple.test\r", b"\n"]:
        c.send(piece)
        c.wait_read_by_server(TIMEOUT)   # each record read on its own
    assert "250 CHUNKING" in c.expect(250).split("\n")
    # several commands and a whole BDAT chunk in one record
    body1 = make_body(3000, 80)
    c.send(b"MAIL FROM:<sender@example.test>\r\nRCPT TO:<rcpt@localhost>\r\nBDAT %d LAST\r\n" % len(body1)
           + body1 + b"NOOP\r\n")
    for code in (250, 250, 250, 250):
        c.expect(code)
    # a BDAT chunk in many small records, the next command in the record
    # that ends the chunk
    body2 = make_body(100000, 81)
    wire = b"MAIL FROM:<sender@example.test>\r\nRCPT TO:<rcpt@localhost>\r\nBDAT %d LAST\r\n" % len(body2) + body2
    wire += b"RSET\r\n"
    for off in range(0, len(wire), 999):
        c.send(wire[off:off + 999])
    for code in (250, 250, 250, 250):
        c.expect(code)
    # DATA with its terminating dot split over records
    body3 = make_body(20000, 82)
    envelope(c)
    c.cmd("DATA", 354)
    stuffed = dot_stuff(body3) + b".\r\nNOOP\r\n"
    cut = len(stuffed) - len(b".\r\nNOOP\r\n") + 1
    c.send(stuffed[:cut])
    c.wait_read_by_server(TIMEOUT)
    c.send(stuffed[cut:])
    c.expect(250)
    c.expect(250)
    c.quit()
    assert_delivered(krelay, [body1, body2, body3])


# ---- TLS 1.3 KeyUpdate (openssl s_client's "k" command) ----

class Interactive:
    """openssl s_client driven line by line (command letters enabled)."""

    def __init__(self, args):
        self.p = subprocess.Popen(["openssl", "s_client", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.out = b""
        self.lock = threading.Lock()
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        while True:
            data = self.p.stdout.read1(65536)
            if not data:
                return
            with self.lock:
                self.out += data

    def text(self):
        with self.lock:
            return self.out.decode(errors="replace")

    def wait_for(self, needle, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if needle in self.text():
                return True
            if self.p.poll() is not None:
                self.t.join(5)
                return needle in self.text()
            time.sleep(0.05)
        return False

    def write(self, data):
        self.p.stdin.write(data)
        self.p.stdin.flush()

    def finish(self, timeout=60):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.t.join(5)


@pytest.mark.parametrize("rx,letter", [(True, b"k"), (False, b"k"), (False, b"K")])
def test_tls13_keyupdate(krelay, rx, letter):
    """k: KeyUpdate with update_not_requested; K: update_requested, which
    obliges the server to send a KeyUpdate before its next record."""
    label = "smtps" if rx else "smtps_norx"
    s = Interactive(["-connect", f"127.0.0.1:{krelay.port(label)}", "-tls1_3", "-no_ticket"])
    try:
        assert s.wait_for("220 "), s.text()
        s.write(b"EHLO client.example.test\r\n")
        assert s.wait_for("250 CHUNKING"), s.text()
        s.write(letter + b"\n")
        assert s.wait_for("KEYUPDATE"), s.text()
        if rx:
            # the kernel cannot follow the new key: the session ends, with a reason
            assert krelay.wait_log("TLS KeyUpdate from unknown[127.0.0.1]: this kernel cannot rekey kTLS RX; "
                                   "closing the session", timeout=30), krelay.log()[-3000:]
            wait_disconnects(krelay, 1)
            assert s.wait_for("closed"), s.text()
        elif letter == b"K":
            # nor can it change the sending key, so the server may not answer
            assert krelay.wait_log("TLS KeyUpdate request from unknown[127.0.0.1]: this kernel cannot rekey kTLS "
                                   "TX; closing the session", timeout=30), krelay.log()[-3000:]
            wait_disconnects(krelay, 1)
            assert s.wait_for("closed"), s.text()
            assert "250 2.0.0 Ok" not in s.text()
        else:
            # OpenSSL reads in userspace and follows the new key
            s.write(b"NOOP\r\n")
            assert s.wait_for("250 2.0.0 Ok"), s.text() + krelay.log()[-3000:]
            s.write(b"quit\r\n")
            assert s.wait_for("221 2.0.0 Bye"), s.text()
    finally:
        s.finish()
    assert wait_established(krelay, 1).endswith("ktls=tx+rx" if rx else "ktls=tx")
    body = relay_survives(krelay)
    assert_delivered(krelay, [body])


# ---- counters at shutdown ----

def test_shutdown_logs_ktls_counters(krelay):
    client(krelay.port("smtps"), "smtps", client_ctx(TLS12)).quit()
    client(krelay.port("smtps"), "smtps", client_ctx(TLS13)).quit()
    client(krelay.port("smtps_norx"), "smtps", client_ctx(TLS13)).quit()
    wait_disconnects(krelay, 3)
    assert krelay.stop() == 0
    log = (krelay.dir / "ktrelay.log").read_text(errors="replace")
    assert "ktls sessions: tls12 tx=1 rx=1 tls13 tx=2 rx=1" in log, log[-2000:]
