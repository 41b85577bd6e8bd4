#!/usr/bin/python3
"""Network fuzzer: mutated SMTP dialogues against a real ktrelay for a bounded time.

Starts BIN (normally the ASan+UBSan build) on a loopback port with a private configuration (local and
virtual delivery, a queue and a relay host that refuses, AUTH from a password file, reject mode for bare
newlines on one service), then runs dialogues built from real ones -- EHLO/HELO, MAIL, RCPT, DATA with
bodies full of end-of-data look-alikes, BDAT chunks with wrong and huge counts, AUTH, STARTTLS, VRFY,
pipelining, long lines -- mutated byte by byte (flips, inserted control bytes and line ends, cuts, repeats)
and sent in random pieces from several connections at once, some closed in the middle. Every few
dialogues a fresh connection must still get a 220 banner and a 250 to NOOP. At the end ktrelay must stop
on SIGTERM with exit 0 and no sanitizer report in its log.

Usage: netfuzz.py --bin build-asan/ktrelay [--seconds 60] [--seed N] [--workers 4]
Exit 0 when the server survived; 1 otherwise (its log tail is printed)."""
import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

MAIN_CF = """\
myhostname = mx.fuzz.test
data_directory = {dir}/data
mydestination = localhost
inet_interfaces = loopback-only
inet_protocols = ipv4
virtual_mailbox_domains = example.test
virtual_mailbox_base = {dir}/mail
virtual_mailbox_maps = texthash:{dir}/vmailbox
alias_maps =
queue_directory = {dir}/queue
relayhost = [127.0.0.1]:9
mynetworks = 127.0.0.2/32
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
smtpd_sasl_auth_enable = yes
ktrelay_sasl_password_file = {dir}/sasl-passwd
smtpd_timeout = 5s
smtpd_error_sleep_time = 0
smtpd_hard_error_limit = 50
message_size_limit = 200000
ktrelay_worker_threads = 2
"""
VMAILBOX = "alice@example.test example.test/alice/\n@example.test example.test/catchall/\n"

DIALOGUES = [
    [b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<alice@example.test>\r\n", b"DATA\r\n",
     b"Subject: x\r\n\r\nhello\r\n..dot\r\n.\r\n", b"QUIT\r\n"],
    [b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org> SIZE=100 BODY=8BITMIME\r\n",
     b"RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.test\r\n",
     b"BDAT 20\r\n", b"Subject: b\r\n\r\nchunk\r\n", b"BDAT 6 LAST\r\n", b"end\r\n\r\n", b"QUIT\r\n"],
    [b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<x@example.test>\r\n", b"DATA\r\n",
     b"a\n.\nMAIL FROM:<e@x>\r\nRCPT TO:<v@x>\r\nDATA\r\n\r.\r\n\r\n.\r\r.\n\r\n.\r\n", b"RSET\r\n",
     b"QUIT\r\n"],
    [b"HELO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nRCPT TO:<root>\r\nDATA\r\n",
     b"x\r\n.\r\nQUIT\r\n"],
    [b"EHLO c.test\r\n", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", b"AUTH LOGIN\r\n", b"YWxpY2U=\r\n",
     b"c2VjcmV0\r\n", b"AUTH PLAIN\r\n", b"*\r\n", b"QUIT\r\n"],
    [b"EHLO [192.0.2.1]\r\n", b"VRFY root\r\n", b"VRFY <alice@example.test>\r\n", b"HELP\r\n", b"NOOP\r\n",
     b"STARTTLS\r\n", b"EXPN x\r\n", b"ETRN x\r\n", b"QUIT\r\n"],
    [b"EHLO c.test\r\n", b"MAIL FROM:<@a,@b:u@[IPv6:2001:db8::1]>\r\n", b"RCPT TO:<\"q@x\"@example.test>\r\n",
     b"RCPT TO:<u%h@example.test>\r\n", b"RCPT TO:<h!u@example.test>\r\n", b"BDAT 99999999999 LAST\r\n",
     b"x" * 5000],
    [b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<alice@example.test>\r\n",
     b"DATA\r\n", b"Subject: big\r\n\r\n" + b"y" * 250000 + b"\r\n.\r\n", b"QUIT\r\n"],
    [b"x" * 3000 + b"\r\n", b"\r\n", b"\n", b"EHLO " + b"a" * 600 + b"\r\n", b"MAIL FROM:<" + b"b" * 700 + b">\r\n"],
    [b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<someone@remote.test>\r\n",
     b"BDAT 10 LAST\r\n", b"relay\r\n1234", b"QUIT\r\n"],
]
INTERESTING = b"\r\n.\0<>@:\"[]\\ \t\x7f\x80\xff=+,%!"


def mutate(rng, dialogue):
    out = []
    for part in dialogue:
        b = bytearray(part)
        for _ in range(rng.choice((0, 0, 1, 1, 2, 4))):
            op = rng.randrange(5)
            pos = rng.randrange(len(b) + 1)
            if op == 0 and b:
                b[min(pos, len(b) - 1)] = rng.choice(INTERESTING)
            elif op == 1:
                b[pos:pos] = bytes([rng.choice(INTERESTING)])
            elif op == 2 and b:
                del b[pos:pos + rng.randrange(1, 8)]
            elif op == 3:
                b[pos:pos] = b[pos:pos + rng.randrange(1, 30)] * rng.randrange(1, 4)
            else:
                b[pos:pos] = str(rng.choice((0, 1, 8191, 8192, 2 ** 31, 2 ** 32 + 1))).encode()
        out.append(bytes(b))
        if rng.random() < 0.05:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
    return out


def run_dialogue(rng, port, parts):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=3)
    except OSError:
        return
    s.settimeout(0.2)
    try:
        data = b"".join(parts)
        cut = len(data) if rng.random() < 0.85 else rng.randrange(len(data) + 1)
        i = 0
        while i < cut:
            n = rng.choice((1, 3, 17, 512, 4096, 65536))
            s.sendall(data[i:min(cut, i + n)])
            i += n
            if rng.random() < 0.2:
                try:
                    s.recv(65536)
                except OSError:
                    pass
        deadline = time.time() + 0.4
        while time.time() < deadline:
            try:
                if not s.recv(65536):
                    break
            except socket.timeout:
                break
    except OSError:
        pass
    finally:
        s.close()


def alive(port):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.settimeout(10)
        f = s.makefile("rb")
        banner = f.readline()
        s.sendall(b"NOOP\r\n")
        noop = f.readline()
        s.close()
        return banner.startswith(b"220 ") and noop.startswith(b"250 ")
    except OSError:
        return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()

    d = tempfile.mkdtemp(prefix="ktrelay-netfuzz-")
    os.chmod(d, 0o711)     # the unprivileged worker (mail_owner) reaches the files below
    port, port2 = free_port(), free_port()
    with open(f"{d}/main.cf", "w") as f:
        f.write(MAIN_CF.format(dir=d))
    with open(f"{d}/master.cf", "w") as f:
        f.write(f"127.0.0.1:{port} inet n - n - - smtpd\n"
                f"127.0.0.1:{port2} inet n - n - - smtpd\n  -o smtpd_forbid_bare_newline=reject\n")
    with open(f"{d}/vmailbox", "w") as f:
        f.write(VMAILBOX)
    with open(f"{d}/sasl-passwd", "w") as f:
        f.write("alice:$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1\n")
    log = open(f"{d}/ktrelay.log", "w+b")
    env = dict(os.environ, ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "detect_leaks=1"),
               UBSAN_OPTIONS=os.environ.get("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1"))
    proc = subprocess.Popen([args.bin, "run", "-c", d], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 20
    while not alive(port):
        if proc.poll() is not None or time.time() > deadline:
            print(open(f"{d}/ktrelay.log", errors="replace").read()[-3000:])
            print("netfuzz: ktrelay did not start")
            return 1
        time.sleep(0.1)

    print(f"netfuzz: seed {args.seed}, {args.seconds:.0f} s, {args.workers} connections at a time")
    stop = time.time() + args.seconds
    count = [0]
    lock = threading.Lock()
    problem = []

    def worker(k):
        rng = random.Random(args.seed * 1000 + k)
        while time.time() < stop and not problem:
            parts = mutate(rng, rng.choice(DIALOGUES))
            run_dialogue(rng, port if rng.random() < 0.7 else port2, parts)
            with lock:
                count[0] += 1
                check = count[0] % 50 == 0
            if check and not alive(port):
                problem.append(f"no banner/NOOP after {count[0]} dialogues")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = not problem and proc.poll() is None and alive(port)
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    log.close()
    text = open(f"{d}/ktrelay.log", errors="replace").read()
    bad = [m for m in ("AddressSanitizer", "runtime error", "LeakSanitizer") if m in text]
    print(f"netfuzz: {count[0]} dialogues; exit code {rc}")
    if not ok or rc != 0 or bad:
        print(text[-6000:])
        print(f"netfuzz: FAILED: {problem or bad or 'exit code %d' % rc} (seed {args.seed}; files in {d})")
        return 1
    subprocess.run(["rm", "-rf", d])
    return 0


if __name__ == "__main__":
    sys.exit(main())
