"""TLS reporting (RFC 8460): one session that succeeds and one whose certificate does not match the MX
name, both to the policy domain example.test (MTA-STS enforce), then `ktrelay tlsrpt flush`: the report
file in the report directory holds the RFC's JSON with the exact counts and result type, next to the
rua from _smtp._tls.example.test, and the mailto: rua receives the same JSON as an
application/tlsrpt+json part; the counts survive a restart."""
import base64
import email
import json
import os
import re
import subprocess

import pytest

from conftest import BIN
from test_mta_sts import final_node, pki, policy_servers, policy_text, records  # noqa: F401  (fixtures)
from test_relay import BODY, nodes, wait_for  # noqa: F401  (fixtures)
from test_relay_dns import dns, dns_cf  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the policy server listens on port 443 (root)")

REPORT_KEYS = {"organization-name", "date-range", "contact-info", "report-id", "policies"}
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def front_cf(d, pki, good_port, bad_port, extra=""):
    # two next hops of the one policy domain: example.test through a server whose certificate names its MX
    # host, example.org (routed to the same domain's MX) through one whose certificate names another host
    return (dns_cf(d) + "myhostname = relay.sender.test\nvirtual_mailbox_domains = localhost\n"
            f"transport_maps = inline:{{example.test=smtp:example.test:{good_port}, "
            f"example.org=smtp:example.test:{bad_port}, reports.test=smtp:[127.0.0.1]:{good_port}}}\n"
            f"ktrelay_mta_sts_enable = yes\nktrelay_mta_sts_CAfile = {pki['ca']}\nsmtp_tls_CAfile = {pki['ca']}\n"
            "ktrelay_tlsrpt_enable = yes\nktrelay_tlsrpt_organization_name = Sender Org\n"
            "ktrelay_tlsrpt_contact_info = tls-reports@sender.test\n"
            "minimal_backoff_time = 1h\nmaximal_backoff_time = 2h\nsmtp_tls_loglevel = 1\n" + extra)


def flush(front):
    p = subprocess.run([BIN, "tlsrpt", "flush", "-c", str(front.d)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def reports(front):
    d = front.d / "data" / "tlsrpt"
    return sorted(p for p in d.glob("*.json")) if d.exists() else []


def test_report_counts_success_and_failure(nodes, dns, pki, policy_servers):
    final = final_node(nodes, pki, names=("mx.example.test", "wrong.example.test"),
                       extra="virtual_mailbox_domains = localhost, example.test, reports.test\n"
                             "virtual_mailbox_maps = texthash:{dir}/vmailbox, "
                             "inline:{tlsrpt@reports.test=reports.test/rpt/}\n")
    policy = policy_text("enforce", ["mx.example.test"])
    srv = policy_servers(pki, "example.test", policy)
    recs = records(srv, ["mx.example.test"])
    recs[("_smtp._tls.example.test", "TXT")] = ["v=TLSRPTv1; rua=mailto:tlsrpt@reports.test,https://reports.test/x"]
    d = dns(recs)
    front = nodes(front_cf(d, pki, final.r.port("smtp0"), final.r.port("smtp1"))).start()
    ok = front.sendmail(["bob@example.test"], BODY)
    bad = front.sendmail(["carol@example.org"], BODY)
    assert front.wait_log(rf"{ok}: to=<bob@example.test>, relay=mx.example.test\[127.0.0.1\]:\d+, .*status=sent"), \
        front.log()
    assert front.wait_log(rf"{bad}: to=<carol@example.org>, relay=none, .*dsn=4.7.5, status=deferred \(Server "
                          r"certificate not verified"), front.log()
    # the counts are kept over a restart (without the deferred message, whose retry would count too)
    assert front.queue("delete", bad).returncode == 0
    front.stop()
    assert (front.d / "data" / "tlsrpt" / "counts").exists()
    front.start()
    assert reports(front) == []
    flush(front)
    files = wait_for(lambda: reports(front))
    assert len(files) == 1, front.log()
    name = files[0].name
    m = re.fullmatch(r"relay\.sender\.test!example\.test!(\d+)!(\d+)\.json", name)
    assert m and int(m.group(1)) <= int(m.group(2)), name
    rua = files[0].with_suffix(".rua").read_text()
    assert rua == "mailto:tlsrpt@reports.test\nhttps://reports.test/x\n"
    raw = files[0].read_bytes()
    rep = json.loads(raw)
    assert set(rep) == REPORT_KEYS
    assert rep["organization-name"] == "Sender Org"
    assert rep["contact-info"] == "tls-reports@sender.test"
    assert set(rep["date-range"]) == {"start-datetime", "end-datetime"}
    assert re.fullmatch(ISO, rep["date-range"]["start-datetime"]) and re.fullmatch(ISO, rep["date-range"]["end-datetime"])
    assert rep["report-id"] == f"{m.group(1)}.{m.group(2)}.example.test@relay.sender.test"
    assert len(rep["policies"]) == 1
    pol = rep["policies"][0]
    assert set(pol) == {"policy", "summary", "failure-details"}
    assert pol["policy"] == {"policy-type": "sts", "policy-string": policy.strip().split("\r\n"),
                             "policy-domain": "example.test", "mx-host": ["mx.example.test"]}
    assert pol["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
    assert len(pol["failure-details"]) == 1
    fd = pol["failure-details"][0]
    assert fd["result-type"] == "certificate-host-mismatch"
    assert fd["receiving-mx-hostname"] == "mx.example.test"
    assert fd["receiving-ip"] == "127.0.0.1" and fd["sending-mta-ip"] == "127.0.0.1"
    assert fd["failed-session-count"] == 1
    assert set(fd) <= {"result-type", "sending-mta-ip", "receiving-mx-hostname", "receiving-mx-helo",
                       "receiving-ip", "failed-session-count", "additional-information", "failure-reason-code"}
    assert "Server certificate not verified" in fd["failure-reason-code"]
    assert re.search(rf"TLS report for example.test written: .*/tlsrpt/{re.escape(name)}", front.log())

    # the mailto: rua gets the report as a message from the null sender
    qid = re.search(r"TLS report for example.test queued as ([0-9A-F]+)", front.log()).group(1)
    assert front.wait_log(rf"{qid}: to=<tlsrpt@reports.test>, .*status=sent"), front.log()
    assert front.wait_log(rf"{qid}: from=<>")
    got = wait_for(lambda: final.r.maildir_files("reports.test/rpt/"))
    msg = email.message_from_bytes(got[0].read_bytes())
    assert msg["TLS-Report-Domain"] == "example.test" and msg["TLS-Report-Submitter"] == "relay.sender.test"
    assert msg["Subject"] == f"Report Domain: example.test Submitter: relay.sender.test Report-ID: <{rep['report-id']}>"
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
    parts = [p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+json"]
    assert len(parts) == 1 and parts[0].get_filename() == name
    assert base64.b64decode(parts[0].get_payload()) == raw

    # a flush with nothing counted since writes nothing new
    before = set(reports(front))
    flush(front)
    assert front.wait_log(r"TLS report flush requested", count=2)
    assert set(reports(front)) == before


def test_no_tlsrpt_record_no_report(nodes, dns, pki, policy_servers):
    final = final_node(nodes, pki, names=("mx.example.test", "wrong.example.test"))
    srv = policy_servers(pki, "example.test", policy_text("enforce", ["mx.example.test"]))
    d = dns(records(srv, ["mx.example.test"]))
    front = nodes(front_cf(d, pki, final.r.port("smtp0"), final.r.port("smtp1"))).start()
    ok = front.sendmail(["bob@example.test"], BODY)
    assert front.wait_log(rf"{ok}: to=<bob@example.test>, .*status=sent"), front.log()
    flush(front)
    assert front.wait_log(r"TLS report for example.test not written: the domain publishes no TLSRPT record"), \
        front.log()
    assert reports(front) == []
