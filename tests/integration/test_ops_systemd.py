"""systemd: `meson install` into a DESTDIR installs the binary, the Type=notify unit, the example
configuration and ktrelay(8); systemd-analyze verify accepts the installed unit (checked with the
installed tree mounted over /usr/local in a private mount namespace, so the host is not touched); the
daemon tells $NOTIFY_SOCKET READY once it accepts, RELOADING and READY around a reload, STOPPING."""
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, BASE_MAIN_CF, BASE_VMAILBOX, free_port, make_searchable

BUILD = Path(BIN).resolve().parent


def installed(tmp_path):
    if not (BUILD / "meson-info").is_dir():
        pytest.skip("KTRELAY_BIN is not in a meson build directory")
    dest = tmp_path / "dest"
    r = subprocess.run(["meson", "install", "-C", str(BUILD), "--destdir", str(dest), "--no-rebuild"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads((BUILD / "meson-info" / "intro-buildoptions.json").read_text())
    opt = {o["name"]: o["value"] for o in info}
    prefix = Path(opt["prefix"])
    return dest, prefix, prefix / opt["sbindir"], prefix / opt["mandir"]


def find_unit(dest):
    units = list(dest.rglob("ktrelay.service"))
    assert len(units) == 1, units
    return units[0]


def test_meson_install_and_systemd_analyze_verify(tmp_path):
    dest, prefix, sbindir, mandir = installed(tmp_path)
    binary = dest / sbindir.relative_to("/") / "ktrelay"
    assert os.access(binary, os.X_OK)
    assert subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.startswith("ktrelay ")
    unit = find_unit(dest)
    text = unit.read_text()
    assert "Type=notify\n" in text
    assert f"ExecStart={sbindir}/ktrelay run -c /etc/ktrelay\n" in text
    assert "@SBINDIR@" not in text
    assert (dest / "etc/ktrelay/main.cf.example").exists() and (dest / "etc/ktrelay/master.cf.example").exists()
    man = dest / mandir.relative_to("/") / "man8" / "ktrelay.8"
    page = subprocess.run(["man", "--warnings", "-l", str(man)], capture_output=True, text=True,
                          env={**os.environ, "MANWIDTH": "200", "LC_ALL": "C.UTF-8"})
    assert page.returncode == 0 and page.stderr == "", page.stderr
    for needle in ("ktrelay check-config [-c DIR]", "ktrelay_metrics_address", "EX_CONFIG", "maillog_file_prefixes",
                   "smtpd_tls_security_level", "relayhost"):
        assert needle in page.stdout, needle

    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("systemd-analyze"):
        pytest.skip("needs root, unshare and systemd-analyze")
    # the installed tree where the unit expects it, in this namespace only; man:ktrelay(8) is checked too
    mounts = []
    for p in (sbindir, mandir):
        if not p.is_dir():
            pytest.skip(f"{p} does not exist on this machine")
        mounts.append(f'mount --bind "{dest / p.relative_to("/")}" "{p}"')
    script = " && ".join(mounts) + f' && systemd-analyze verify "{unit}"'
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr
    # and it can fail: a unit naming a program that is not there
    bad = tmp_path / "ktrelay-bad.service"
    bad.write_text(text.replace(f"{sbindir}/ktrelay run", "/nonexistent/ktrelay run"))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        " && ".join(mounts) + f' && systemd-analyze verify "{bad}"'], capture_output=True, text=True)
    assert r.returncode != 0 and "/nonexistent/ktrelay" in r.stderr


def test_sd_notify_ready_reloading_stopping(tmp_path):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(15)
    d = tmp_path / "relay"
    d.mkdir()
    make_searchable(d)
    (d / "vmailbox").write_text(BASE_VMAILBOX)
    (d / "main.cf").write_text(BASE_MAIN_CF.format(dir=d) + f"queue_directory = {d}/queue\n")
    port = free_port()
    (d / "master.cf").write_text(f"127.0.0.1:{port} inet n - n - - smtpd\n")
    logf = open(d / "ktrelay.log", "w+b")
    proc = subprocess.Popen([BIN, "run", "-c", str(d)], stdout=logf, stderr=subprocess.STDOUT,
                            env={**os.environ, "NOTIFY_SOCKET": str(sock_path)})
    try:
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg.split("\n"), msg
        # READY means accepting: the port answers at once
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            assert c.recv(1024).startswith(b"220 ")
        proc.send_signal(signal.SIGHUP)
        msg = sock.recv(4096).decode()
        assert "RELOADING=1" in msg.split("\n"), msg
        assert any(line.startswith("MONOTONIC_USEC=") for line in msg.split("\n")), msg
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg.split("\n"), msg
        proc.send_signal(signal.SIGTERM)
        msg = sock.recv(4096).decode()
        assert "STOPPING=1" in msg.split("\n"), msg
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        logf.close()
