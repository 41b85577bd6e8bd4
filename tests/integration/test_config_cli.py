"""The configuration command line: check-config, config -n, version, and how
main.cf/master.cf problems are reported (file:line, did-you-mean, parameters
that are Postfix's but not implemented, ignored master.cf services)."""
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import BIN, BASE_MAIN_CF, BASE_VMAILBOX, SmtpConn, free_port, make_cert, make_searchable


def write_conf(tmp_path, main_cf, master_cf=None):
    make_searchable(tmp_path)        # for mail_owner, when run as root
    (tmp_path / "vmailbox").write_text(BASE_VMAILBOX)
    (tmp_path / "main.cf").write_text(BASE_MAIN_CF.format(dir=tmp_path) + main_cf)
    if master_cf is not None:
        (tmp_path / "master.cf").write_text(master_cf)
    return tmp_path


def ktrelay(*args):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=30)


def test_check_config_ok(tmp_path):
    d = write_conf(tmp_path, "message_size_limit = 2000000\n", "127.0.0.1:2599 inet n - n - - smtpd\n")
    r = ktrelay("check-config", "-c", str(d))
    assert r.returncode == 0, r.stderr
    assert "configuration OK" in r.stdout
    assert "error" not in r.stderr


def test_check_config_bad_number_reports_file_and_line(tmp_path):
    # line numbers count the base configuration written before the extra lines
    extra = "smtpd_banner = $myhostname ESMTP\nmessage_size_limit = 10x\n"
    d = write_conf(tmp_path, extra, "127.0.0.1:2599 inet n - n - - smtpd\n")
    lines = (d / "main.cf").read_text().splitlines()
    lineno = lines.index("message_size_limit = 10x") + 1
    r = ktrelay("check-config", "-c", str(d))
    assert r.returncode == 78
    assert f"main.cf:{lineno}: bad numerical value for message_size_limit" in r.stderr, r.stderr
    assert "configuration has errors" in r.stderr
    assert "configuration OK" not in r.stdout


def test_check_config_bad_time_and_bool(tmp_path):
    d = write_conf(tmp_path, "smtpd_timeout = soon\nsmtpd_tls_wrappermode = perhaps\n",
                   "127.0.0.1:2599 inet n - n - - smtpd\n")
    r = ktrelay("check-config", "-c", str(d))
    assert r.returncode == 78
    assert re.search(r"main\.cf:\d+: bad time value for smtpd_timeout", r.stderr), r.stderr
    assert re.search(r"main\.cf:\d+: bad boolean value for smtpd_tls_wrappermode", r.stderr), r.stderr


def test_bad_override_in_master_cf_points_at_master_cf(tmp_path):
    d = write_conf(tmp_path, "", "127.0.0.1:2599 inet n - n - - smtpd\n  -o smtpd_recipient_limit=many\n")
    r = ktrelay("check-config", "-c", str(d))
    assert r.returncode == 78
    assert re.search(r"master\.cf:1: bad numerical value for smtpd_recipient_limit", r.stderr), r.stderr


def test_did_you_mean_warning(tmp_path):
    d = write_conf(tmp_path, "smtpd_tls_CApth = /etc/ssl/certs\n", "127.0.0.1:2599 inet n - n - - smtpd\n")
    r = ktrelay("check-config", "-c", str(d))
    assert r.returncode == 0, r.stderr          # a warning, not an error
    assert re.search(r"warning: \S*main\.cf:\d+: unknown parameter smtpd_tls_CApth "
                     r"\(did you mean smtpd_tls_CApath\?\)", r.stderr), r.stderr


def test_not_implemented_warning(tmp_path):
    d = write_conf(tmp_path, "debug_peer_list = 192.0.2.1\n", "127.0.0.1:2599 inet n - n - - smtpd\n")
    r = ktrelay("check-config", "-c", str(d))
    assert r.returncode == 0, r.stderr
    assert re.search(r"warning: \S*main\.cf:\d+: parameter debug_peer_list is a Postfix parameter that ktrelay "
                     r"does not implement", r.stderr), r.stderr


def test_not_implemented_filter_is_an_error(tmp_path):
    d = write_conf(tmp_path, "smtp_header_checks = regexp:/etc/postfix/smtp_header_checks\n",
                   "127.0.0.1:2599 inet n - n - - smtpd\n")
    r = ktrelay("check-config", "-c", str(d))
    assert r.returncode == 78, r.stderr
    assert re.search(r"error: \S*main\.cf:\d+: parameter smtp_header_checks is not implemented by ktrelay", r.stderr), \
        r.stderr


def test_config_n_prints_what_main_cf_sets(tmp_path):
    extra = "message_size_limit = 4096000\nsmtpd_banner = $myhostname ESMTP ready\nsmtpd_timeout = 30s\n"
    d = write_conf(tmp_path, extra, "127.0.0.1:2599 inet n - n - - smtpd\n")
    r = ktrelay("config", "-c", str(d), "-n")
    assert r.returncode == 0, r.stderr
    expected = {}
    for line in (d / "main.cf").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            expected[k.strip()] = v.strip()
    printed = [line for line in r.stdout.splitlines() if line]
    got = {}
    for line in printed:
        k, v = line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
        got[k] = v
    assert got == expected
    assert printed == sorted(printed, key=lambda s: s.split(" =")[0])   # postconf -n order


def test_config_without_n_shows_defaults_and_values(tmp_path):
    d = write_conf(tmp_path, "message_size_limit = 4096000\n", "127.0.0.1:2599 inet n - n - - smtpd\n")
    r = ktrelay("config", "-c", str(d))
    assert r.returncode == 0, r.stderr
    assert "message_size_limit = 4096000\n" in r.stdout
    assert "smtpd_recipient_limit = 1000\n" in r.stdout
    assert "smtp_header_checks" not in r.stdout      # not implemented, not listed
    assert "\nheader_checks = \n" in r.stdout and "\nbody_checks_size_limit = 51200\n" in r.stdout


def test_version():
    for args in (("version",), ("--version",)):
        r = ktrelay(*args)
        assert r.returncode == 0
        assert re.fullmatch(r"ktrelay \d+\.\d+\.\d+\n", r.stdout), r.stdout


def test_help_lists_commands_and_exit_codes():
    r = ktrelay("--help")
    assert r.returncode == 0
    for word in ("run", "check-config", "config [-n] [NAME...]", "sendmail", "queue", "KTRELAY_CONFIG",
                 "/etc/ktrelay", "78 configuration error"):
        assert word in r.stdout, word


def test_usage_errors(tmp_path):
    # sysexits(3): EX_USAGE for the command line, EX_CONFIG for the configuration
    assert ktrelay().returncode == 64
    assert ktrelay("frobnicate", "-c", str(tmp_path)).returncode == 64
    assert ktrelay("check-config", "-c", str(tmp_path), "extra").returncode == 64
    assert ktrelay("queue", "-c", str(tmp_path), "frob").returncode == 64
    r = ktrelay("check-config", "-c", str(tmp_path / "missing"))
    assert r.returncode == 78
    assert "cannot read" in r.stderr


def test_config_dir_rule_same_for_every_command(tmp_path):
    """-c DIR, else $KTRELAY_CONFIG, else /etc/ktrelay, else ./ktrelay-data; never a silent guess."""
    if os.path.exists("/etc/ktrelay/main.cf"):
        pytest.skip("this machine has /etc/ktrelay/main.cf")
    (tmp_path / "conf").mkdir()
    d = write_conf(tmp_path / "conf", "myhostname = fromenv.example\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "KTRELAY_CONFIG"}

    def run(*args, cwd=empty, extra=None):
        return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=30, cwd=cwd,
                              env={**env, **(extra or {})})

    for args in (("check-config",), ("config", "myhostname"), ("queue", "list")):
        r = run(*args)
        assert r.returncode == 78, (args, r)
        assert "give -c DIR" in r.stderr and "KTRELAY_CONFIG" in r.stderr, r.stderr
        r = run(*args, extra={"KTRELAY_CONFIG": str(d)})
        assert r.returncode == 0, (args, r.stderr)
    r = run("config", "myhostname", extra={"KTRELAY_CONFIG": str(d)})
    assert r.stdout == "myhostname = fromenv.example\n"
    # -c wins over the environment, in any position
    (tmp_path / "other").mkdir()
    other = write_conf(tmp_path / "other", "myhostname = fromc.example\n")
    r = run("config", "myhostname", "-c", str(other), extra={"KTRELAY_CONFIG": str(d)})
    assert r.stdout == "myhostname = fromc.example\n"
    r = run("queue", "list", "-c", str(other))
    assert r.returncode == 0 and r.stdout == "Mail queue is empty\n", r
    # ./ktrelay-data is found by every command once it exists
    (empty / "ktrelay-data").mkdir()
    write_conf(empty / "ktrelay-data", "myhostname = embedded.example\n")
    r = run("config", "myhostname")
    assert r.returncode == 0 and r.stdout == "myhostname = embedded.example\n", r


def test_config_names_like_postconf(tmp_path):
    d = write_conf(tmp_path, "message_size_limit = 4096000\nmy_own = $myhostname\n")
    r = ktrelay("config", "-c", str(d), "message_size_limit", "smtpd_recipient_limit", "my_own")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ("message_size_limit = 4096000\nsmtpd_recipient_limit = 1000\n"
                        "my_own = $myhostname\n")
    r = ktrelay("config", "myhostnam", "-c", str(d))
    assert r.returncode == 64 and r.stdout == ""
    assert "myhostnam: unknown parameter (did you mean myhostname?)" in r.stderr


def test_privileged_port_as_non_root_says_what_to_do(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if not os.access(BIN, os.X_OK) or subprocess.run(["runuser", "-u", "nobody", "--", BIN, "version"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("the build is not reachable for nobody")
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory(dir="/tmp") as t:   # pytest's tmp_path is private to root
        d = write_conf(Path(t), "", "127.0.0.1:25 inet n - n - - smtpd\n")
        os.chmod(t, 0o755)
        (d / "data").mkdir()
        os.chmod(d / "data", 0o777)                      # data_directory: nobody takes the instance lock
        r = subprocess.run(["runuser", "-u", "nobody", "--", BIN, "run", "-c", str(d)], capture_output=True,
                           text=True, timeout=30)
    assert r.returncode == 77, r.stderr
    assert "cannot listen on 127.0.0.1:25" in r.stderr
    assert "run ktrelay as root, or grant the binary CAP_NET_BIND_SERVICE" in r.stderr


def test_default_banner_hides_version(relay):
    version = ktrelay("version").stdout.split()[1]
    c = SmtpConn(relay.port(), timeout=10)
    banner = c.banner
    c.quit()
    assert banner.startswith("220 mx.example.test ESMTP ktrelay"), banner
    assert version not in banner


def test_master_cf_service_names_and_overrides(tmp_path):
    cert, key = make_cert(tmp_path)
    master = ("submission inet n - n - - smtpd\n"
              "  -o smtpd_recipient_limit=7\n"
              "  -o { smtpd_banner = $myhostname submission here }\n"
              "smtps inet n - n - - smtpd\n"
              "  -o smtpd_tls_wrappermode=yes\n"
              "  -o message_size_limit=12345\n"
              "pickup unix n - n 60 1 pickup\n"
              "cleanup unix n - n - 0 cleanup\n")
    d = write_conf(tmp_path, f"smtpd_tls_eccert_file = {cert}\nsmtpd_tls_eckey_file = {key}\n", master)
    r = ktrelay("check-config", "-c", str(d))
    assert r.returncode == 0, r.stderr
    assert re.search(r"master\.cf:7: service pickup/unix ignored", r.stderr), r.stderr
    assert re.search(r"master\.cf:8: service cleanup/unix ignored", r.stderr), r.stderr
    assert "warning" not in r.stderr and "error" not in r.stderr, r.stderr

    # The well-known names map to their ports. Run in a private network
    # namespace so that binding 587 and 465 cannot collide with anything.
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a private network namespace")
    p = subprocess.Popen(["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {BIN} run -c {d}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = ""
    deadline = time.time() + 10
    while "daemon started" not in log and time.time() < deadline and p.poll() is None:
        log += p.stdout.readline()
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    log += p.communicate(timeout=15)[0]
    assert p.returncode == 0, log
    assert "listening on 127.0.0.1:587 (service submission)" in log, log
    assert "listening on 127.0.0.1:465 (service smtps, implicit TLS)" in log, log


def test_master_cf_overrides_take_effect(relay_factory):
    r = relay_factory("smtpd_recipient_limit = 50\n",
                      services={"a": {"smtpd_recipient_limit": "1", "smtpd_banner": "${myhostname}-override"},
                                "b": {}})
    group = "HELO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nQUIT\r\n"
    c = SmtpConn(r.port("a"), timeout=10)
    assert c.banner == "220 mx.example.test-override"
    c.send(group)
    got = [c.reply() for _ in range(5)]
    c.close()
    assert got[3].startswith("452 4.5.3"), got
    c = SmtpConn(r.port("b"), timeout=10)
    assert c.banner.startswith("220 mx.example.test ESMTP")
    c.send(group)
    got = [c.reply() for _ in range(5)]
    c.close()
    assert got[3].startswith("250 2.1.5"), got


def test_run_refuses_broken_config(tmp_path):
    port = free_port()
    d = write_conf(tmp_path, "smtpd_hard_error_limit = lots\n", f"127.0.0.1:{port} inet n - n - - smtpd\n")
    r = subprocess.run([BIN, "run", "-c", str(d)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 78
    assert "bad numerical value for smtpd_hard_error_limit" in r.stderr
    assert "fatal: configuration errors" in r.stderr
