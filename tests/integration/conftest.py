"""Fixtures for integration tests: a real ktrelay process on free loopback
ports, configured with Postfix-syntax main.cf/master.cf in a temporary
directory, delivering into real Maildir folders.

The binary is taken from $KTRELAY_BIN (set by the meson test definition) or
build/ktrelay relative to the source tree.
"""
import contextlib
import os
import pathlib
import re
import signal
import ssl
import socket
import subprocess
import time

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("KTRELAY_BIN", str(SRC / "build" / "ktrelay"))


_ports_given = set()


def free_port():
    """A loopback TCP port nothing listens on, never one this process handed out before: the kernel picks
    bind(0) ports at random, so two calls in a row can return the same one, and two master.cf services given
    the same port would make the second replace the first."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            if len(_ports_given) > 10000:
                _ports_given.clear()
            _ports_given.add(port)
            return port


def make_cert(directory, name="cert", kind="ec", passphrase=None, cn="localhost"):
    """Self-signed certificate with the openssl command; returns (cert, key)."""
    cert = directory / f"{name}.pem"
    key = directory / f"{name}.key"
    if kind == "ec":
        newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    else:
        newkey = ["-newkey", "rsa:2048"]
    cmd = ["openssl", "req", "-x509", *newkey, "-keyout", str(key), "-out", str(cert), "-days", "30",
           "-subj", f"/CN={cn}", "-addext", f"subjectAltName=DNS:{cn}"]
    if passphrase:
        cmd += ["-passout", f"pass:{passphrase}"]
    else:
        cmd += ["-nodes"]
    subprocess.run(cmd, check=True, capture_output=True)
    return cert, key


class Relay:
    """A running ktrelay. `ports` maps service label -> port; `log()` returns stderr so far."""

    def __init__(self, tmp, main_cf, services, env=None):
        make_searchable(tmp)             # the workers run as mail_owner when the tests run as root
        self.dir = tmp
        self.maildir_base = tmp / "mail"
        self.ports = {}
        master = []
        for label, opts in services.items():
            port = free_port()
            self.ports[label] = port
            # "_fields": master.cf's private unpriv chroot wakeup maxproc columns
            master.append(f"127.0.0.1:{port} inet {opts.get('_fields', 'n - n - -')} smtpd")
            for k, v in opts.items():
                if k != "_fields":
                    master.append(f"  -o {k}={v}")
        (tmp / "main.cf").write_text(main_cf)
        (tmp / "master.cf").write_text("\n".join(master) + "\n")
        self.logfile = open(tmp / "ktrelay.log", "w+b")
        self.proc = subprocess.Popen([BIN, "run", "-c", str(tmp)], stdout=self.logfile, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self._wait_listening()

    def _wait_listening(self):
        deadline = time.time() + 20
        # the master binds the ports before the worker process serves them (connections would wait in
        # the backlog meanwhile); it logs "daemon started" once the worker is up, with everything it
        # serves: wait for that first, so the probes below are sessions that end at once
        while "daemon started" not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError("ktrelay exited at start-up:\n" + self.log())
            if time.time() > deadline:
                raise RuntimeError("ktrelay did not start:\n" + self.log())
            time.sleep(0.05)
        for port in self.ports.values():
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("ktrelay exited at start-up:\n" + self.log())
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError("ktrelay did not listen:\n" + self.log())
                    time.sleep(0.05)

    def port(self, label="smtp"):
        return self.ports[label]

    def log(self):
        self.logfile.flush()
        with open(self.dir / "ktrelay.log", "rb") as f:
            return f.read().decode(errors="replace")

    def wait_log(self, text, timeout=5, count=1):
        """True once text occurs count times in the log; False after timeout seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.log().count(text) >= count:
                return True
            time.sleep(0.05)
        return False

    def maildir_files(self, box="localhost/catchall/", sub="new"):
        d = self.maildir_base / box / sub
        return sorted(d.iterdir()) if d.exists() else []

    def open_spool_files(self, box="localhost/catchall/", sub="tmp"):
        """Files in the mailbox's sub/ that the instance's processes hold open, named or not: a delivery spools
        into an unnamed O_TMPFILE there (/proc shows it as "DIR/#INODE (deleted)")."""
        d = str(self.maildir_base / box / sub) + "/"
        found = []
        for pid in [self.proc.pid] + child_pids(self.proc.pid):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(d):
                    found.append(target)
        return sorted(found)

    def threads_state(self):
        """For a failure message: each thread of the instance's processes with its state, the kernel
        function it waits in, and its kernel stack where /proc shows it (root), then the log's tail."""
        out = []
        for pid in [self.proc.pid] + child_pids(self.proc.pid):
            try:
                tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
            except OSError:
                continue
            for tid in tids:
                t = f"/proc/{pid}/task/{tid}"
                parts = []
                for name in ("comm", "wchan", "stat", "stack"):
                    try:
                        with open(f"{t}/{name}") as f:
                            v = f.read().strip()
                    except OSError:
                        continue
                    if name == "stat":
                        v = "state " + v.rsplit(")", 1)[1].split()[0]
                    parts.append(v)
                out.append(f"{pid}/{tid}: " + " | ".join(parts))
        return "\n".join(out) + "\n--- log ---\n" + self.log()[-4000:]

    def stop(self, sig=signal.SIGTERM, timeout=15):
        """Stop the instance: the master and every process it started. After SIGKILL the master's
        children (worker, delivery agent) end through their parent-death signal a moment later, still
        holding the instance lock and the queue: wait until they have exited too."""
        if self.proc.poll() is None:
            kids = child_pids(self.proc.pid)
            stop_process(self.proc, sig, timeout)
            wait_until(lambda: not any(alive(k) for k in kids), timeout=10,
                       what=f"processes {kids} of the stopped instance to exit")
        self.logfile.close()
        return self.proc.returncode


# What every final delivery prepends (Postfix's virtual(8) and local(8)): return path, original recipient,
# recipient.
TRACE_HEADERS = re.compile(rb"Return-Path: <[^\r\n]*>\r\nX-Original-To: [^\r\n]*\r\nDelivered-To: [^\r\n]*\r\n")


def after_trace(data):
    """A delivered file's bytes after its trace headers (Return-Path:, X-Original-To:, Delivered-To:)."""
    m = TRACE_HEADERS.match(data)
    assert m, data[:300]
    return data[m.end():]


def stop_process(proc, sig=signal.SIGTERM, timeout=15):
    """Sends sig to the subprocess proc and reaps it, killing it after timeout seconds; its exit status."""
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def child_pids(pid):
    """PIDs whose parent is pid (from /proc/PID/stat)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(d))
    return kids


def alive(pid):
    """True while pid runs (a zombie has already closed its files and counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


BASE_MAIN_CF = """\
myhostname = mx.example.test
# each test's own instance lock (master.lock), files and queue: tests run side by side
data_directory = {dir}/data
queue_directory = {dir}/queue
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
virtual_mailbox_domains = localhost, example.test
virtual_mailbox_base = {dir}/mail
virtual_mailbox_maps = texthash:{dir}/vmailbox
alias_maps =
queue_directory = {dir}/queue
# client names come from the DNS the tests run (test_client_dns.py); elsewhere every client is unknown[addr]
smtpd_peername_lookup = no
ktrelay_worker_threads = 2
# like an Internet-facing MX: no test client may relay (198.51.100.0/24 is TEST-NET-2), and relay
# attempts are refused for good rather than deferred
mynetworks = 198.51.100.0/24
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
"""

BASE_VMAILBOX = """\
postmaster@localhost localhost/postmaster/
alice@example.test   example.test/alice/
bob@example.test     example.test/bob/
@localhost           localhost/catchall/
"""


MAIL_OWNER = "ktrelay"


def ensure_mail_owner():
    """As root, ktrelay's workers run as mail_owner (default ktrelay): make the user when it is missing."""
    if os.geteuid() != 0:
        return
    if subprocess.run(["id", "-u", MAIL_OWNER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--home-dir", "/var/lib/ktrelay", "--shell", "/usr/sbin/nologin",
                        MAIL_OWNER], check=True, capture_output=True)


def make_searchable(path):
    """Let mail_owner reach PATH: pytest makes its temporary folders 0700 (root's)."""
    if os.geteuid() != 0:
        return
    p = pathlib.Path(path).resolve()
    for d in [p, *p.parents]:
        if d == pathlib.Path("/"):
            break
        mode = d.stat().st_mode & 0o7777
        if not mode & 0o001:
            os.chmod(d, mode | 0o001)


def give_to_mail_owner(*paths):
    """As root: what a test makes inside the mail directory must belong to mail_owner, as the worker
    that writes there does (the files' owner when ktrelay runs as root)."""
    if os.geteuid() != 0:
        return
    import pwd
    pw = pwd.getpwnam(MAIL_OWNER)
    for p in paths:
        os.chown(p, pw.pw_uid, pw.pw_gid, follow_symlinks=False)


@pytest.fixture(autouse=True, scope="session")
def _mail_owner():
    ensure_mail_owner()


@pytest.fixture
def relay_factory(tmp_path):
    """relay_factory(extra_main_cf="", services={"smtp": {}}) -> Relay. Stopped at teardown; the test
    fails if ktrelay did not exit 0 on SIGTERM (a crash or sanitizer report)."""
    relays = []

    def start(extra_main_cf="", services=None, vmailbox=BASE_VMAILBOX, env=None):
        d = tmp_path / f"relay{len(relays)}"
        d.mkdir()
        make_searchable(d)
        (d / "vmailbox").write_text(vmailbox)
        main_cf = BASE_MAIN_CF.format(dir=d) + extra_main_cf.replace("{dir}", str(d))
        r = Relay(d, main_cf, services or {"smtp": {}}, env=env)
        relays.append(r)
        return r

    yield start
    for r in relays:
        rc = r.stop()
        log = r.log() if not r.logfile.closed else (r.dir / "ktrelay.log").read_text(errors="replace")
        assert rc == 0, f"ktrelay exited with {rc}:\n{log[-4000:]}"
        assert "runtime error" not in log and "AddressSanitizer" not in log, log[-4000:]


@pytest.fixture
def relay(relay_factory):
    """A plaintext ktrelay with the base configuration on one port."""
    return relay_factory()


def port_busy(port):
    with socket.socket() as s:
        # as the server does: TIME_WAIT left by an earlier run is no obstacle
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@contextlib.contextmanager
def embedded_default(directory):
    """`ktrelay run` without -c in `directory`, as a first-time user starts it (fixed ports 2525 and
    4465; the caller skips when they are busy). Yields the directory; checks a clean exit at the end."""
    make_searchable(directory)
    logpath = directory / "default.log"
    logf = open(logpath, "w+b")
    proc = subprocess.Popen([BIN, "run"], cwd=directory, stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    deadline = time.time() + 15
    for port in (2525, 4465):
        while True:
            if proc.poll() is not None:
                pytest.fail("ktrelay exited: " + logpath.read_text(errors="replace"))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline:
                    proc.kill()
                    pytest.fail("not listening: " + logpath.read_text(errors="replace"))
                time.sleep(0.05)
    try:
        yield directory
    finally:
        rc = stop_process(proc)
        logf.close()
    log = logpath.read_text(errors="replace")
    assert rc == 0, log[-4000:]
    assert "runtime error" not in log and "AddressSanitizer" not in log, log[-4000:]


def wait_until(pred, timeout=10, what="condition"):
    """Polls pred until it returns something true, which is returned; fails the test after timeout s."""
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def wait_for(fn, timeout=20, interval=0.1):
    """Polls fn until it returns something true, which is returned; after timeout seconds, what fn
    returns then (false: the caller's assert says what was missing)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(interval)
    return fn()


def made_by_test(make, end="close"):
    """The body of a factory fixture: `yield from made_by_test(Peer)` gives the test make itself
    (same arguments, same result) and ends everything it made at teardown with its method named end."""
    made = []

    def factory(*args, **kw):
        made.append(make(*args, **kw))
        return made[-1]

    yield factory
    for thing in made:
        getattr(thing, end)()


@contextlib.contextmanager
def new_system_user(tmp_path, prefix):
    """A real system user PREFIX<pid> with its home made by useradd -m in tmp_path/home/, for local
    delivery; removed at the end (one left over from an interrupted run goes first). Yields its pwd
    entry (pw_name, pw_dir). Needs root."""
    import pwd
    name = f"{prefix}{os.getpid() % 100000}"
    home = tmp_path / "home" / name
    home.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["useradd", "-m", "-d", str(home), "-s", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=True, capture_output=True)


def tcp_sockets():
    """Every IPv4 TCP socket of this host as dicts (local_port, remote_port, state, tx_queue, rx_queue),
    from /proc/net/tcp: the server runs on loopback, so its side of a connection is visible too."""
    rows = []
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            tx, rx = fields[4].split(":")
            rows.append({"local_port": int(fields[1].split(":")[1], 16),
                         "remote_port": int(fields[2].split(":")[1], 16),
                         "state": int(fields[3], 16), "tx_queue": int(tx, 16), "rx_queue": int(rx, 16)})
    return rows


TCP_ESTABLISHED = 1


def insecure_ctx():
    """A TLS client context that accepts any certificate (the tests' servers use self-signed ones)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class SmtpConn:
    """The tests' one raw SMTP client: exact bytes out, whole (multi-line) replies in.

    SmtpConn(port)                     connect to 127.0.0.1:port and read the greeting into .banner
    SmtpConn(port, src="127.0.0.2")    ... from that source address (a "different client")
    SmtpConn(port, tls=ctx)            implicit TLS (smtps, wrapper mode) before the greeting
    SmtpConn(sock=s)                   on a socket the caller connected
    greeting=False                     leave the greeting unread (.banner is None)

    Replies come as one string, lines joined with '\\n' without CRLF (reply, cmd, expect), or as a list
    of lines (reply_lines, cmd_lines). Each send() is one write, so over TLS one record up to 16 KiB:
    tests control how bytes fall into records. A TLS peer that closes without close_notify raises
    ssl.SSLError rather than looking like a clean end."""

    def __init__(self, port=None, *, sock=None, src=None, timeout=20, tls=None, greeting=True):
        if sock is None:
            sock = socket.socket()
            sock.settimeout(timeout)
            if src:
                sock.bind((src, 0))
            sock.connect(("127.0.0.1", port))
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False)
        self.sock = sock
        self.buf = b""
        self.reads = []
        self.banner = self.reply() if greeting else None

    def send(self, data):
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _fill(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(f"connection closed; unread: {self.buf!r}")
        self.reads.append(chunk)
        self.buf += chunk

    def reply_lines(self):
        """The next reply as a list of its lines (without CRLF)."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return lines

    def reply(self):
        """The next reply, all of its lines joined with '\\n' (without CRLF)."""
        return "\n".join(self.reply_lines())

    def expect(self, code):
        """The next reply, which must have this code."""
        r = self.reply()
        assert r[:3] == str(code), f"expected {code}, got {r!r}"
        return r

    def cmd(self, line, code=None):
        """Send one command line; its reply (checked against code when given)."""
        self.send(line + "\r\n")
        return self.expect(code) if code is not None else self.reply()

    def cmd_lines(self, line):
        self.send(line + "\r\n")
        return self.reply_lines()

    def ehlo(self, name="client.example.net"):
        """EHLO, which must succeed; the reply's lines."""
        lines = self.cmd_lines(f"EHLO {name}")
        assert lines[-1].startswith("250 "), lines
        return lines

    def starttls(self, ctx=None):
        """STARTTLS and the handshake; nothing may have been sent after the 220 (RFC 3207)."""
        assert self.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
        assert self.buf == b""
        self.sock = (ctx or insecure_ctx()).wrap_socket(self.sock, server_hostname="localhost",
                                                       suppress_ragged_eofs=False)

    def wait_read_by_server(self, timeout=10):
        """Waits until the server has taken everything sent so far off its socket (its receive queue is
        empty): it is then working on those bytes, e.g. waiting for the rest of a BDAT chunk."""
        here, there = self.sock.getsockname()[1], self.sock.getpeername()[1]

        def drained():
            return any(s["local_port"] == there and s["remote_port"] == here and s["rx_queue"] == 0
                       for s in tcp_sockets())
        wait_until(drained, timeout, "the server to read what was sent")

    def quit(self):
        """QUIT, which must be answered 221, and close."""
        self.cmd("QUIT", 221)
        self.close()

    def closed(self, timeout=10, drain=False):
        """True when the server closes the connection with nothing more to say (drain: after
        whatever else it sends); False if it is still open after timeout seconds."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.buf or self.sock.recv(65536)
                self.buf = b""
                if data == b"":
                    return True
                if not drain:
                    return False
        except (ConnectionResetError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
