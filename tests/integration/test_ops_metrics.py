"""ktrelay_metrics_address: Prometheus text at GET /metrics, parsed with python3-prometheus-client's own
parser; every counter equals the traffic sent and the log lines that report it."""
import smtplib
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from conftest import BIN, free_port, make_cert, wait_for
from test_ops_logs import refusing_port

parser = pytest.importorskip("prometheus_client.parser")


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples = {}
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_count_the_traffic(relay_factory, tmp_path, request):
    cert, key = make_cert(tmp_path)
    mport = free_port()
    holder, closed = refusing_port()
    request.addfinalizer(holder.close)
    r = relay_factory(f"ktrelay_metrics_address = 127.0.0.1:{mport}\n"
                      f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n"
                      "smtpd_tls_security_level = may\n"
                      "mynetworks = 127.0.0.0/8\n"
                      "queue_directory = {dir}/queue\n"
                      f"transport_maps = inline:{{ {{defer.test=smtp:[127.0.0.1]:{closed}}} }}\n")
    port = r.port()
    before = scrape(mport)
    # the readiness probe's session may still be closing: wait for the gauge to settle
    deadline = time.time() + 10
    while value(before, "ktrelay_connections", service="smtpd") != 0 and time.time() < deadline:
        time.sleep(0.05)
        before = scrape(mport)
    assert value(before, "ktrelay_messages_received_total") == 0
    assert value(before, "ktrelay_connections", service="smtpd") == 0

    tls_bytes = 0
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for i in range(3):
        body = f"Subject: tls {i}\r\n\r\n" + "x" * (100 * (i + 1)) + "\r\n"
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.starttls(context=ctx)
            c.sendmail("alice@example.test", ["bob@example.test"], body)
        tls_bytes += len(body)
    for i in range(2):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.sendmail("alice@example.test", ["bob@example.test", "alice@example.test"], f"Subject: plain {i}\r\n\r\nx\r\n")
    for i in range(2):
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                c.sendmail("alice@example.test", [f"nobody{i}@example.test"], "Subject: no\r\n\r\nx\r\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.sendmail("alice@example.test", ["x@defer.test"], "Subject: later\r\n\r\nx\r\n")
    assert r.wait_log("status=deferred", timeout=20), r.log()

    def settled():
        s = scrape(mport)
        return (value(s, "ktrelay_connections", service="smtpd") == 0
                and value(s, "ktrelay_queue_messages", queue="deferred") == 1)
    assert wait_for(settled), scrape(mport)
    s = scrape(mport)
    log = r.log()
    assert value(s, "ktrelay_messages_received_total") == 6 == log.count("message-id=")
    assert value(s, "ktrelay_deliveries_total", status="sent") == 7 == log.count("status=sent")
    assert value(s, "ktrelay_deliveries_total", status="deferred") == 1 == log.count("status=deferred")
    assert value(s, "ktrelay_deliveries_total", status="bounced") == 0
    assert value(s, "ktrelay_smtpd_rejects_total", stage="rcpt") == 2 == log.count("reject: RCPT from")
    assert value(s, "ktrelay_tls_sessions_total") == 3
    assert value(s, "ktrelay_tls_handshakes_total", version="TLSv1.3", resumed="no") == 3
    assert value(s, "ktrelay_tls_handshake_seconds_count") == 3
    assert value(s, "ktrelay_tls_handshake_seconds_bucket", le="+Inf") == 3
    assert 0 < value(s, "ktrelay_tls_handshake_seconds_sum") < 30
    # the message bytes over TLS, split by who decrypted them (kernel TLS where it exists, else OpenSSL)
    assert (value(s, "ktrelay_tls_bytes_total", direction="rx", path="ktls")
            + value(s, "ktrelay_tls_bytes_total", direction="rx", path="userspace")) == tls_bytes
    assert value(s, "ktrelay_delivery_seconds_count") == 7
    assert value(s, "ktrelay_queue_messages", queue="active") == 0
    assert value(s, "ktrelay_connections", service="smtp") == 0


def test_metrics_endpoint_answers_only_metrics(relay_factory):
    mport = free_port()
    relay_factory(f"ktrelay_metrics_address = 127.0.0.1:{mport}\n")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{mport}/", timeout=10)
    assert e.value.code == 404
    req = urllib.request.Request(f"http://127.0.0.1:{mport}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405


def test_metrics_off_by_default_and_address_checked(tmp_path):
    (tmp_path / "main.cf").write_text("ktrelay_metrics_address = 127.0.0.1\nalias_maps =\n")
    r = subprocess.run([BIN, "check-config", "-c", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 78
    assert 'ktrelay_metrics_address: "127.0.0.1": expected host:port' in r.stderr
    (tmp_path / "main.cf").write_text("alias_maps =\n")
    r = subprocess.run([BIN, "config", "-c", str(tmp_path), "ktrelay_metrics_address"], capture_output=True,
                       text=True)
    assert r.stdout == "ktrelay_metrics_address = \n"


def test_grafana_dashboard_uses_exported_metrics(relay_factory):
    """deploy/grafana/ktrelay-dashboard.json: the TLS cost panels exist and every metric it queries is exported."""
    import json
    import re
    from conftest import SRC
    dash = json.loads((SRC / "deploy" / "grafana" / "ktrelay-dashboard.json").read_text())
    titles = [p["title"] for p in dash["panels"]]
    for want in ("TLS handshake time", "Session resumption ratio", "Share of TLS sessions on kTLS",
                 "Share of TLS message bytes on kTLS"):
        assert any(t.startswith(want) for t in titles), titles
    used = set()
    for p in dash["panels"]:
        for t in p.get("targets", []):
            used |= set(re.findall(r"\bktrelay_[a-z0-9_]+", t["expr"]))
    mport = free_port()
    relay_factory(f"ktrelay_metrics_address = 127.0.0.1:{mport}\n")
    exported = {name for name, _ in scrape(mport)}
    assert used and used <= exported, used - exported
