"""Exhaustion: out of file descriptors (ulimit -n 256 with 400 connections) ktrelay neither spins nor
floods its log, and serves again once connections close; a client that trickles bytes is cut off by
smtpd_per_request_deadline and smtpd_min_data_rate."""
import os
import resource
import socket
import subprocess
import time

import pytest

from conftest import BASE_MAIN_CF, BASE_VMAILBOX, BIN, Relay, SmtpConn, free_port, make_searchable


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks     # utime + stime


def test_descriptor_limit(tmp_path):
    make_searchable(tmp_path)     # the unprivileged worker reaches its files
    (tmp_path / "vmailbox").write_text(BASE_VMAILBOX)
    limit = 256

    def lower_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    port = free_port()
    # no per-client limit: all 400 connections come from one address
    (tmp_path / "main.cf").write_text(BASE_MAIN_CF.format(dir=tmp_path) + "smtpd_client_connection_count_limit = 0\n")
    (tmp_path / "master.cf").write_text(f"127.0.0.1:{port} inet n - n - - smtpd\n")
    log = open(tmp_path / "ktrelay.log", "w+b")
    proc = subprocess.Popen([BIN, "run", "-c", str(tmp_path)], stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lower_limit)
    socks = []
    try:
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.05)
        text = (tmp_path / "ktrelay.log").read_text()
        assert f"open file limit {limit}: room for about {limit - 64} sessions" in text, text
        # 400 connections: some 190 become sessions, the rest wait in the listen backlog
        for _ in range(400):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        deadline = time.time() + 15
        while "not accepting for" not in (tmp_path / "ktrelay.log").read_text():
            assert time.time() < deadline, (tmp_path / "ktrelay.log").read_text()[-2000:]
            time.sleep(0.1)
        # at the limit: measure CPU and log growth over a few seconds
        size0, cpu0, t0 = os.path.getsize(tmp_path / "ktrelay.log"), cpu_seconds(proc.pid), time.time()
        time.sleep(4)
        size1, cpu1, t1 = os.path.getsize(tmp_path / "ktrelay.log"), cpu_seconds(proc.pid), time.time()
        print(f"at the descriptor limit: CPU {100 * (cpu1 - cpu0) / (t1 - t0):.1f} %, log growth "
              f"{size1 - size0} bytes in {t1 - t0:.1f} s")
        assert (cpu1 - cpu0) / (t1 - t0) < 0.30, f"CPU {100 * (cpu1 - cpu0) / (t1 - t0):.0f} % at the limit"
        assert size1 - size0 < 1_000_000
        assert proc.poll() is None
        # the lines about it are rate-limited: one per 10 s at most (two listeners may each say it once)
        assert (tmp_path / "ktrelay.log").read_text().count("not accepting for") <= 3
        # connections close: service resumes, also for those that waited in the backlog
        for s in socks[:300]:
            s.close()
        del socks[:300]
        deadline = time.time() + 15
        while True:
            try:
                c = SmtpConn(port, timeout=5)
                break
            except (OSError, EOFError):
                assert time.time() < deadline
                time.sleep(0.2)
        assert c.banner.startswith("220 ")
        assert c.cmd("EHLO client.test").startswith("250")
        c.close()
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        rc = proc.wait(timeout=20)
        log.close()
    text = (tmp_path / "ktrelay.log").read_text()
    assert rc == 0, text[-3000:]
    assert "runtime error" not in text and "AddressSanitizer" not in text


def test_trickling_client_is_cut_off(relay_factory):
    r = relay_factory("smtpd_timeout = 3s\n")
    clients = [SmtpConn(sock=socket.create_connection(("127.0.0.1", r.port()), timeout=15)) for _ in range(20)]
    data_client = SmtpConn(sock=socket.create_connection(("127.0.0.1", r.port()), timeout=15))
    assert data_client.cmd("EHLO client.test").startswith("250")
    assert data_client.cmd("MAIL FROM:<a@example.org>").startswith("250")
    assert data_client.cmd("RCPT TO:<x@localhost>").startswith("250")
    assert data_client.cmd("DATA").startswith("354")
    t0 = time.time()
    closed = set()
    line = b"NOOP and a very long argument that never ends"
    i = 0
    while len(closed) < len(clients) + 1 and time.time() - t0 < 12:
        # one byte every half second: each read used to restart smtpd_timeout
        for k, c in enumerate(clients + [data_client]):
            if k in closed:
                continue
            try:
                c.sock.send(line[i % len(line):i % len(line) + 1])
            except OSError:
                closed.add(k)
        i += 1
        time.sleep(0.5)
        for k, c in enumerate(clients + [data_client]):
            if k in closed:
                continue
            c.sock.setblocking(False)
            try:
                d = c.sock.recv(4096)
                c.buf += d
                if not d:
                    closed.add(k)
            except BlockingIOError:
                pass
            except OSError:
                closed.add(k)
            c.sock.setblocking(True)
    elapsed = time.time() - t0
    assert len(closed) == len(clients) + 1, f"{len(closed)} of {len(clients) + 1} cut off after {elapsed:.1f} s"
    # 3 s for a request, plus up to a second of tick, plus 12 trickled bytes at 500 bytes/s
    assert elapsed < 7
    for c in clients + [data_client]:
        assert c.buf.endswith(b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n"), c.buf
    assert r.wait_log("timeout after DATA from unknown[127.0.0.1]")
    # a client that sends at a normal pace is not affected: a whole message well within smtpd_timeout
    c = SmtpConn(sock=socket.create_connection(("127.0.0.1", r.port()), timeout=15))
    assert c.cmd("EHLO client.test").startswith("250")
    assert c.cmd("MAIL FROM:<a@example.org>").startswith("250")
    assert c.cmd("RCPT TO:<x@localhost>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    for _ in range(5):
        c.send(b"x" * 2000 + b"\r\n")
        time.sleep(0.8)
    c.send(b".\r\n")
    assert c.reply().startswith("250 2.0.0")
    c.close()
