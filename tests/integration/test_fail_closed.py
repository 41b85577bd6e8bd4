"""A configuration fails closed: every value ktrelay would not honour exactly as Postfix means it is
refused, by check-config and by run alike, naming the parameter and the file and line that set it;
and one instance runs per data_directory."""
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import (BASE_MAIN_CF, BASE_VMAILBOX, BIN, Relay, SmtpConn, free_port, make_cert, make_searchable,
                      wait_until)


def write_conf(d, extra_main="", overrides=()):
    """The base configuration plus EXTRA_MAIN at the end of main.cf and one service with OVERRIDES
    (-o lines). Returns the 1-based line numbers of the extra main.cf lines and of the service line."""
    d.mkdir(exist_ok=True)
    (d / "vmailbox").write_text(BASE_VMAILBOX)
    base = BASE_MAIN_CF.format(dir=d)
    (d / "main.cf").write_text(base + extra_main)
    first = base.count("\n") + 1
    master = [f"127.0.0.1:{free_port()} inet n - n - - smtpd"] + [f"  -o {o}" for o in overrides]
    (d / "master.cf").write_text("\n".join(master) + "\n")
    return first


# (main.cf line or None, -o override or None, parameter, what the message says)
BAD = [
    # TLS security levels: Postfix's words only; the client-only ones are named as such
    ("smtpd_tls_security_level = mandatory", None, "smtpd_tls_security_level", "expected none, may or encrypt"),
    ("smtpd_tls_security_level = verify", None, "smtpd_tls_security_level", "client-only TLS security level"),
    ("smtpd_tls_security_level = secure", None, "smtpd_tls_security_level", "client-only TLS security level"),
    ("smtpd_tls_security_level = encrpyt", None, "smtpd_tls_security_level", "did you mean encrypt?"),
    (None, "smtpd_tls_security_level=verify", "smtpd_tls_security_level", "client-only TLS security level"),
    ("smtp_tls_security_level = dane_only", None, "smtp_tls_security_level", "did you mean dane-only?"),
    ("smtp_dns_support_level = dnsec", None, "smtp_dns_support_level", "did you mean dnssec?"),
    # smtp_tls_policy_maps: every entry is read at load, a wrong word fails at the parameter's line
    ("smtp_tls_policy_maps = inline:{ example.com=encrpyt }", None, "smtp_tls_policy_maps",
     'entry "example.com": unknown TLS security level "encrpyt" (did you mean encrypt?)'),
    ("smtp_tls_policy_maps = inline:{ {example.com = secure mach=nexthop} }", None, "smtp_tls_policy_maps",
     'unknown attribute "mach" (did you mean match?)'),
    ("smtp_tls_policy_maps = inline:{ {example.com = encrypt match=nexthop} }", None, "smtp_tls_policy_maps",
     "the match attribute is only for the fingerprint, verify and secure levels"),
    ("smtp_tls_policy_maps = inline:{ {[mx.example.com]:587 = secure protocols=>=TLSv1.4} }", None,
     "smtp_tls_policy_maps", "unknown TLS protocol"),
    ("smtp_tls_policy_maps = inline:{ {example.com = secure tafile=/etc/ta.pem} }", None, "smtp_tls_policy_maps",
     'unsupported attribute "tafile"'),
    ("smtp_tls_policy_maps = inline:{ example.com=fingerprint }", None, "smtp_tls_policy_maps",
     "the fingerprint level needs match="),
    ("smtp_tls_security_level = fingerprint", None, "smtp_tls_security_level",
     "needs smtp_tls_fingerprint_cert_match"),
    ("smtp_tls_security_level = encrytp", None, "smtp_tls_security_level", "did you mean encrypt?"),
    # yes/no
    ("smtpd_use_tls = ture", None, "smtpd_use_tls", "expected yes or no"),
    (None, "smtpd_tls_wrappermode=1", "smtpd_tls_wrappermode", "expected yes or no"),
    (None, "smtpd_sasl_auth_enable=on", "smtpd_sasl_auth_enable", "expected yes or no"),
    ("tls_ktls_enable = maybe", None, "tls_ktls_enable", "expected yes or no"),
    # protocol lists and cipher grades, server and client
    ("smtpd_tls_protocols = !SSLv2, !TLSv1.4", None, "smtpd_tls_protocols", "unknown TLS protocol"),
    ("smtpd_tls_mandatory_protocols = >=TLS1.2", None, "smtpd_tls_mandatory_protocols", "did you mean TLSv1.2?"),
    ("smtp_tls_protocols = !SSLv2 !SSL3", None, "smtp_tls_protocols", "unknown TLS protocol"),
    ("smtp_tls_mandatory_protocols = TLSv2", None, "smtp_tls_mandatory_protocols", "unknown TLS protocol"),
    ("smtpd_tls_ciphers = hihg", None, "smtpd_tls_ciphers", "did you mean high?"),
    ("smtpd_tls_mandatory_ciphers = export", None, "smtpd_tls_mandatory_ciphers", "export cipher grade"),
    ("smtp_tls_ciphers = strong", None, "smtp_tls_ciphers", "expected high, medium or low"),
    ("smtp_tls_mandatory_ciphers = meduim", None, "smtp_tls_mandatory_ciphers", "did you mean medium?"),
    # other enumerations
    ("inet_protocols = ipv5", None, "inet_protocols", "did you mean ipv4?"),
    ("mynetworks_style = hots", None, "mynetworks_style", "did you mean host?"),
    ("smtpd_sasl_type = dovcot", None, "smtpd_sasl_type", "did you mean dovecot?"),
    ("smtp_sasl_type = dovecot", None, "smtp_sasl_type", "expected cyrus"),
    ("smtpd_sasl_security_options = noanonymous, noplaintxt", None, "smtpd_sasl_security_options",
     "did you mean noplaintext?"),
    (None, "smtpd_sasl_tls_security_options=noanonymus", "smtpd_sasl_tls_security_options",
     "did you mean noanonymous?"),
    # restriction names (the service's list, reported at the line that set it)
    ("smtpd_recipient_restrictions = permit_mynetwork, reject_unauth_destination", None,
     "smtpd_recipient_restrictions", "did you mean permit_mynetworks?"),
    (None, "smtpd_client_restrictions=permit_sasl_authenticated,rejct", "smtpd_client_restrictions",
     'unknown restriction "rejct"'),
    # table types
    ("alias_maps = hahs:/etc/aliases", None, "alias_maps", "did you mean hash?"),
    ("transport_maps = /etc/postfix/transport", None, "transport_maps", "expected type:table"),
    ("virtual_uid_maps = statc:1000", None, "virtual_uid_maps", "did you mean static?"),
    # what run would fail on later: listen addresses, the DNS servers
    ("ktrelay_dns_servers = 127.0.0.x:53", None, "ktrelay_dns_servers", "bad server list"),
    # time and size units
    ("smtpd_timeout = 300x", None, "smtpd_timeout", "bad time value"),
    ("maximal_queue_lifetime = 5days", None, "maximal_queue_lifetime", "bad time value"),
    (None, "smtpd_starttls_timeout=1y", "smtpd_starttls_timeout", "bad time value"),
    ("message_size_limit = 10M", None, "message_size_limit", "bad numerical value"),
    ("bounce_size_limit = 0", None, "bounce_size_limit", "must be at least 1"),
    ("disable_mime_output_conversion = maybe", None, "disable_mime_output_conversion", "bad boolean value"),
    # errors from building the settings carry the line too
    ("smtpd_upstream_proxy_protocol = haproxi", None, "smtpd_upstream_proxy_protocol", "unsupported value"),
    (None, "smtpd_upstream_proxy_protocol=nginx", "smtpd_upstream_proxy_protocol", "unsupported value"),
    ("anvil_rate_time_unit = 0", None, "anvil_rate_time_unit", "must be at least 1s"),
    ("syslog_facility = mial", None, "syslog_facility", "unknown facility"),
    ("data_directory = relative/data", None, "data_directory", "must be an absolute path"),
    # run's master creates queue_directory one level deep, so check-config refuses what it could not make
    ("queue_directory = /nonexistent/ktrelay-queue", None, "queue_directory",
     "cannot be created: its parent /nonexistent is not an existing directory"),
    ("queue_directory = /etc/hostname", None, "queue_directory", "is not a directory"),
    ("smtpd_client_event_limit_exceptions = 192.0.2.0/99", None, "smtpd_client_event_limit_exceptions",
     "bad address pattern"),
    # stricter subdomain matching than ktrelay implements would relay or permit for more than asked
    ("parent_domain_matches_subdomains = debug_peer_list, smtpd_access_maps", None,
     "parent_domain_matches_subdomains", "keep relay_domains in the list"),
    ("parent_domain_matches_subdomains =", None, "parent_domain_matches_subdomains",
     "does not implement the list without relay_domains"),
    (None, "parent_domain_matches_subdomains=relay_domains", "parent_domain_matches_subdomains",
     "keep smtpd_access_maps in the list"),
    # -o typos: the override would silently not apply
    (None, "smtpd_tls_wrapermode=yes", "smtpd_tls_wrapermode", "did you mean smtpd_tls_wrappermode?"),
    (None, "smtpd_sasl_auth_enabled=yes", "smtpd_sasl_auth_enabled", "unknown parameter in -o override"),
    # Postfix features that change who may send, what is filtered or where mail goes
    ("smtpd_proxy_filter = 127.0.0.1:10025", None, "smtpd_proxy_filter", "not implemented by ktrelay"),
    ("always_bcc = archive@example.com", None, "always_bcc", "not implemented by ktrelay"),
    # non_smtpd_milters is checked like smtpd_milters (fail closed on a value not understood)
    ("non_smtpd_milters = { inet:127.0.0.1:8891, default_action=bounce }", None, "non_smtpd_milters",
     "non_smtpd_milters:"),
    (None, "content_filter=amavis:[127.0.0.1]:10024", "content_filter", 'transport "amavis" is not supported'),
    ("content_filter = smtp:", None, "content_filter", "expected transport:nexthop with one next hop"),
    ("smtpd_proxy_filter = 127.0.0.1:10025", None, "smtpd_proxy_filter", "not implemented by ktrelay"),
    ("smtp_header_checks = regexp:/etc/postfix/smtp_header_checks", None, "smtp_header_checks",
     "not implemented by ktrelay"),
    ("relocated_maps = hash:/etc/postfix/relocated", None, "relocated_maps", "not implemented by ktrelay"),
    ("masquerade_domains = example.com", None, "masquerade_domains", "not implemented by ktrelay"),
    ("propagate_unmatched_extensions = canonical, virtual, alias", None, "propagate_unmatched_extensions",
     "does not propagate extensions into local alias expansions"),
    ("canonical_classes = envelope_sender, header_sendr", None, "canonical_classes",
     "did you mean header_sender?"),
    ("smtp_header_checks = regexp:/etc/postfix/smtp_header_checks", None, "smtp_header_checks",
     "not implemented by ktrelay"),
    # smarthost AUTH on, but no password table: Postfix stops too
    ("smtp_sasl_auth_enable = yes", None, "smtp_sasl_auth_enable", "needs a password table in smtp_sasl_password_maps"),
    ("smtp_sasl_security_options = noanonymous, nosuch", None, "smtp_sasl_security_options", 'bad value "nosuch"'),
    ("smtp_sasl_mechanism_filter = hash:/etc/postfix/filter", None, "smtp_sasl_mechanism_filter",
     "not tables or files"),
    ("smtpd_data_restrictions = reject_unauth_pipelining", None, "smtpd_data_restrictions",
     "not implemented by ktrelay"),
    (None, "smtpd_tls_req_ccert=yes", "smtpd_tls_req_ccert", "not implemented by ktrelay"),
    # a .forward path ktrelay would not look at
    ("forward_path = /var/forward/$user", None, "forward_path", "checks only $home/.forward"),
]


def ids(case):
    return (case[0] or "-o " + case[1]).split(" = ")[0].split("=")[0]


def run_refuses(d):
    """`ktrelay run` on D: it must exit non-zero at once, without serving."""
    proc = subprocess.Popen([BIN, "run", "-c", str(d)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        pytest.fail("run accepted the configuration:\n" + out)
    return proc.returncode, out


@pytest.mark.parametrize("main_line,override,param,message", BAD, ids=[ids(c) for c in BAD])
def test_bad_value_refused_by_check_config_and_run(tmp_path, main_line, override, param, message):
    first = write_conf(tmp_path, main_line + "\n" if main_line else "", [override] if override else [])
    where = f"{tmp_path}/main.cf:{first}:" if main_line else f"{tmp_path}/master.cf:1:"
    chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert chk.returncode == 78, chk.stderr                  # EX_CONFIG
    assert "configuration OK" not in chk.stdout
    lines = [line for line in chk.stderr.splitlines() if "error: " in line and where in line and param in line]
    assert lines and message in lines[0], chk.stderr
    rc, out = run_refuses(tmp_path)
    assert rc == 78, out
    assert lines[0].split("error: ", 1)[1] in out, out        # the same message, from the same check
    assert "daemon started" not in out and "listening on" not in out


def test_outbound_transport_overrides_are_refused(tmp_path):
    """master.cf's smtp and relay transports (unix ... smtp) stand for ktrelay's one outbound client,
    which takes main.cf's values: an -o there (TLS asked per transport) would silently not apply, so
    both check-config and run refuse it at its line; Debian's -o syslog_name only warns."""
    write_conf(tmp_path)
    master = (tmp_path / "master.cf").read_text()
    (tmp_path / "master.cf").write_text(master + "smtp      unix  -       -       y       -       -       smtp\n"
                                        "  -o smtp_tls_security_level=encrypt\n"
                                        "relay     unix  -       -       y       -       -       smtp\n"
                                        "        -o syslog_name=postfix/$service_name\n")
    message = (f"{tmp_path}/master.cf:2: service smtp/unix: -o smtp_tls_security_level is not applied: "
               "ktrelay's outbound client uses main.cf's values for every transport")
    chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert chk.returncode == 78 and "error: " + message in chk.stderr, chk.stderr
    assert "master.cf:4: -o syslog_name is not implemented per service" in chk.stderr
    assert "service relay/unix: -o syslog_name" not in chk.stderr
    rc, out = run_refuses(tmp_path)
    assert rc == 78 and message in out, out
    # the opt-out turns it into a warning
    write_conf(tmp_path, "ktrelay_ignore_unimplemented = yes\n")
    (tmp_path / "master.cf").write_text(master + "relay unix - - n - - smtp -o smtp_tls_security_level=encrypt\n")
    chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert chk.returncode == 0, chk.stderr
    assert "warning: " + message.replace("master.cf:2: service smtp/", "master.cf:2: service relay/") in chk.stderr


def test_tls_build_errors_name_the_line_that_set_the_value(tmp_path):
    """An error from building a TLS context is reported at the line of the parameter it is about
    (the CA file, the protocol list), not at the certificate's line; a level from the legacy
    smtpd_enforce_tls is reported at that switch."""
    tmp_path.mkdir(exist_ok=True)
    cert, key = make_cert(tmp_path)
    tls = f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\nsmtpd_tls_security_level = may\n"
    for extra, line, param, message in [
            (f"smtpd_tls_CAfile = {tmp_path}/none.pem\n", 4, "smtpd_tls_CAfile", "cannot load CA certificates"),
            ("smtpd_tls_protocols = !TLSv1, !TLSv1.1, !TLSv1.2, !TLSv1.3\n", 4, "smtpd_tls_protocols",
             "leaves no usable TLS version"),
            ("smtp_tls_security_level = may\nsmtp_tls_CAfile = /nonexistent/ca.pem\n", 5, "smtp_tls_CAfile",
             "outbound TLS: cannot load CA certificates"),
            ("smtpd_tls_cert_file =\nsmtpd_tls_security_level =\nsmtpd_enforce_tls = yes\n", 6,
             "smtpd_enforce_tls", "TLS is required but neither smtpd_tls_cert_file")]:
        first = write_conf(tmp_path, tls + extra)
        where = f"{tmp_path}/main.cf:{first + line - 1}: "
        chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True,
                             timeout=30)
        assert chk.returncode == 78, chk.stderr
        lines = [x for x in chk.stderr.splitlines() if "error: " in x]
        assert len(lines) == 1 and where in lines[0] and message in lines[0], (param, chk.stderr)


def test_disable_vrfy_command_is_honoured(relay_factory):
    """disable_vrfy_command = yes (address-harvesting hardening) was ignored with a warning and VRFY
    told which recipients exist; now VRFY gets Postfix's 502 and EHLO does not announce it, per service."""
    r = relay_factory("disable_vrfy_command = yes\n",
                      services={"smtp": {}, "submission": {"disable_vrfy_command": "no"}})
    assert "parameter disable_vrfy_command" not in r.log()
    c = SmtpConn(r.port("smtp"))
    assert "250-VRFY" not in c.ehlo()
    assert c.cmd("VRFY carol@example.test") == "502 5.5.1 VRFY command is disabled"
    assert c.cmd("VRFY <alice@example.test>") == "502 5.5.1 VRFY command is disabled"
    c.quit()
    c = SmtpConn(r.port("submission"))
    assert "250-VRFY" in c.ehlo()
    assert c.cmd("VRFY <alice@example.test>") == "252 2.0.0 alice@example.test"
    c.quit()


def test_default_parent_domain_matches_subdomains_is_accepted(tmp_path):
    """Postfix's default list, in Postfix's or another order, passes (and is ktrelay's behaviour)."""
    write_conf(tmp_path, "parent_domain_matches_subdomains = smtpd_access_maps relay_domains,"
                         " debug_peer_list, fast_flush_domains, mynetworks, permit_mbox_mail_relay\n")
    chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert chk.returncode == 0 and "parent_domain_matches_subdomains" not in chk.stderr, chk.stderr


def test_ignore_unimplemented_lets_it_run(relay_factory):
    """An operator who knows what the missing features do can opt out: warnings, and it serves."""
    r = relay_factory("ktrelay_ignore_unimplemented = yes\n"
                      "smtp_header_checks = regexp:/etc/postfix/smtp_header_checks\n",
                      services={"smtp": {"smtpd_proxy_filter": "127.0.0.1:10025"}})
    log = r.log()
    assert re.search(r"warning: \S+/main\.cf:\d+: parameter smtp_header_checks is not implemented by ktrelay; "
                     r"ignored because ktrelay_ignore_unimplemented = yes", log), log
    assert re.search(r"warning: \S+/master\.cf:1: parameter smtpd_proxy_filter is not implemented", log), log


def test_cosmetic_unimplemented_and_empty_values_warn_only(tmp_path):
    write_conf(tmp_path, "debug_peer_level = 3\nsmtpd_proxy_filter =\nheader_checks =\n")
    chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert chk.returncode == 0, chk.stderr
    assert "parameter debug_peer_level is a Postfix parameter that ktrelay does not implement; ignored" in chk.stderr
    assert "parameter smtpd_proxy_filter is a Postfix parameter that ktrelay does not implement; ignored (empty)" \
        in chk.stderr


def test_unknown_main_cf_name_stays_a_warning(tmp_path):
    write_conf(tmp_path, "smtpd_tls_CApth = /etc/ssl/certs\n")
    chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert chk.returncode == 0, chk.stderr
    assert "warning: " in chk.stderr and "unknown parameter smtpd_tls_CApth (did you mean smtpd_tls_CApath?)" \
        in chk.stderr


def test_queue_manager_settings_are_checked_by_check_config(tmp_path):
    """The queue manager's parameters go through the same build as the server's: what run refuses,
    check-config refuses (a missing transport table, an unusable client CA file)."""
    for line, message in [(f"transport_maps = texthash:{tmp_path}/nonexistent", "transport_maps: open"),
                          (f"smtp_tls_security_level = verify\nsmtp_tls_CAfile = {tmp_path}/none.pem",
                           "outbound TLS")]:
        write_conf(tmp_path, line + "\n")
        chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True,
                             timeout=30)
        assert chk.returncode == 78 and message in chk.stderr, chk.stderr
        rc, out = run_refuses(tmp_path)
        assert rc == 78 and message in out, out


def test_second_instance_is_refused(tmp_path):
    d = tmp_path / "first"
    d.mkdir()
    (d / "vmailbox").write_text(BASE_VMAILBOX)
    first = Relay(d, BASE_MAIN_CF.format(dir=d), {"smtp": {}})
    lock = first.dir / "data" / "master.lock"
    assert int(lock.read_text()) == first.proc.pid
    # the same configuration again: refused, naming the PID that holds the lock
    rc, out = run_refuses(first.dir)
    assert rc == 75, out                                     # EX_TEMPFAIL
    assert f"ktrelay is already running as PID {first.proc.pid} with data_directory {first.dir}/data" in out, out
    # another configuration directory with the same data_directory is the same instance
    other = tmp_path / "other"
    write_conf(other, f"data_directory = {first.dir}/data\n")
    rc, out = run_refuses(other)
    assert rc == 75 and f"already running as PID {first.proc.pid}" in out, out
    # the first one is unaffected and still serves
    c = SmtpConn(first.port(), timeout=5)
    assert c.banner.startswith("220 ")
    c.quit()
    # once it has stopped (even killed), the lock is free again
    first.proc.kill()
    first.proc.wait()
    second = Relay(first.dir, (first.dir / "main.cf").read_text(), {"smtp": {}})
    try:
        assert int(lock.read_text()) == second.proc.pid
    finally:
        assert second.stop() == 0


def test_listen_address_that_does_not_resolve(tmp_path):
    """inet_interfaces (for a service without a host) is resolved when the settings are built, as the
    server will resolve it, so check-config refuses what run would."""
    write_conf(tmp_path, "inet_interfaces = 127.0.0.300\n")
    (tmp_path / "master.cf").write_text(f"{free_port()} inet n - n - - smtpd\n")
    chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert chk.returncode == 78, chk.stderr
    assert re.search(r"error: \S+/main\.cf:\d+: service \d+: inet_interfaces: cannot resolve listen address "
                     r"127\.0\.0\.300", chk.stderr), chk.stderr
    rc, out = run_refuses(tmp_path)
    assert rc == 78 and "cannot resolve listen address 127.0.0.300" in out, out


@pytest.mark.parametrize("second,listens,first_listens", [
    ("localhost:{p}", "127.0.0.1:{p}", "127.0.0.1:{p}"),      # another name for the same address
    ("{p}", "0.0.0.0:{p}", "127.0.0.1:{p}"),                   # the wildcard address takes the same port
])
def test_services_that_would_share_a_port_are_refused(tmp_path, second, listens, first_listens):
    """Two master.cf services on one address and port: Postfix's master cannot bind the second and stops.
    ktrelay's listeners are SO_REUSEPORT sockets that would both bind and split the connections between
    the two, here one that requires TLS and one that does not, so check-config and run refuse it."""
    cert, key = make_cert(tmp_path)
    write_conf(tmp_path, f"inet_interfaces = all\ninet_protocols = ipv4\nsmtpd_tls_cert_file = {cert}\n"
               f"smtpd_tls_key_file = {key}\n")
    p = free_port()
    (tmp_path / "master.cf").write_text(f"127.0.0.1:{p} inet n - n - - smtpd\n"
                                        f"  -o smtpd_tls_security_level=encrypt\n"
                                        f"{second.format(p=p)} inet n - n - - smtpd\n")
    message = (f"{tmp_path}/master.cf:3: service {second.format(p=p)} would listen on {listens.format(p=p)}, "
               f"where service 127.0.0.1:{p} ({tmp_path}/master.cf:1) already listens on "
               f"{first_listens.format(p=p)}: give each master.cf service its own address and port")
    chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert chk.returncode == 78 and "error: " + message + "\n" in chk.stderr, chk.stderr
    rc, out = run_refuses(tmp_path)
    assert rc == 78 and message in out, out
    assert "listening on" not in out


def test_link_local_addresses_of_two_zones_are_two_addresses(tmp_path):
    """fe80::1 on one interface and fe80::1 on another are different addresses (RFC 4007 zones), so two
    services may listen on them with one port; the same zone named twice (by name, then by index) is one
    address and is refused. A zone is written by interface name or number: lo is always index 1, and an
    index no interface has is still a zone to compare (nothing is bound by check-config)."""
    write_conf(tmp_path, "inet_protocols = ipv6\n")
    p = free_port()
    (tmp_path / "master.cf").write_text(f"[fe80::1%lo]:{p} inet n - n - - smtpd\n"
                                        f"[fe80::1%4000]:{p} inet n - n - - smtpd\n")
    chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert chk.returncode == 0, chk.stderr
    (tmp_path / "master.cf").write_text(f"[fe80::1%lo]:{p} inet n - n - - smtpd\n"
                                        f"[fe80::1%1]:{p} inet n - n - - smtpd\n")
    chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True, timeout=30)
    message = (f"{tmp_path}/master.cf:2: service [fe80::1%1]:{p} would listen on [fe80::1%lo]:{p}, where service "
               f"[fe80::1%lo]:{p} ({tmp_path}/master.cf:1) already listens on [fe80::1%lo]:{p}: give each "
               f"master.cf service its own address and port")
    assert chk.returncode == 78 and "error: " + message + "\n" in chk.stderr, chk.stderr


def test_one_address_named_twice_for_a_service_is_one_listener(tmp_path):
    """inet_interfaces = 127.0.0.1, localhost names one address twice: Postfix makes the list unique and
    listens once, and so does ktrelay (it is not two services sharing a port)."""
    write_conf(tmp_path, "inet_interfaces = 127.0.0.1, localhost\ninet_protocols = ipv4\n")
    p = free_port()
    (tmp_path / "master.cf").write_text(f"{p} inet n - n - - smtpd\n")
    chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert chk.returncode == 0, chk.stderr
    make_searchable(tmp_path)            # the workers run as mail_owner
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([BIN, "run", "-c", str(tmp_path)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "daemon started" in log.read_text() or proc.poll() is not None, 20, "the daemon to start")
        text = log.read_text()
        assert text.count("listening on ") == 1 and f"listening on 127.0.0.1:{p} (service {p}" in text, text
        c = SmtpConn(p)
        assert c.banner.startswith("220 ")
        c.quit()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("main_extra,service,message", [
    ("", None, "no listening addresses: add an inet smtpd service to master.cf"),
    ("inet_protocols = all\n", "[::ffff:127.0.0.1]:{p}",
     "listen address ::ffff:127.0.0.1 is an IPv4-mapped IPv6 address: write the IPv4 address"),
    ("inet_protocols = ipv4\n", "[::1]:{p}", "cannot resolve listen address ::1"),
], ids=["no-service", "v4-mapped", "family-disabled"])
def test_listen_addresses_run_would_refuse(tmp_path, main_extra, service, message):
    """What run cannot listen on, check-config refuses too: no inet smtpd service at all (a master.cf whose
    smtp service is postscreen's), an IPv4-mapped IPv6 address (the IPv6 listeners are IPv6-only), and an
    address of a family inet_protocols turns off (Postfix does not listen there either)."""
    write_conf(tmp_path, main_extra)
    p = free_port()
    (tmp_path / "master.cf").write_text(f"{service.format(p=p)} inet n - n - - smtpd\n" if service else
                                        f"{p} inet n - n - 1 postscreen\nsmtpd pass - - n - - smtpd\n")
    chk = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert chk.returncode == 78 and message in chk.stderr, chk.stderr
    rc, out = run_refuses(tmp_path)
    assert rc in (69, 78) and message in out, out


def test_a_port_another_instance_serves_is_refused(relay_factory, tmp_path):
    """A second ktrelay (another data_directory, so the instance lock does not stop it) configured on a port
    the first one serves: its SO_REUSEPORT listeners would bind beside the first one's and take part of its
    connections. It refuses to start, as Postfix's master fails to bind a port in use."""
    first = relay_factory()
    second = tmp_path / "second"
    write_conf(second)
    (second / "master.cf").write_text(f"127.0.0.1:{first.port()} inet n - n - - smtpd\n")
    rc, out = run_refuses(second)
    assert rc == 69, out
    assert (f"fatal: cannot listen on 127.0.0.1:{first.port()}: Address already in use: another server (or "
            "ktrelay) holds that port") in out, out
    c = SmtpConn(first.port())
    assert c.banner.startswith("220 mx.example.test ESMTP")
    c.quit()
