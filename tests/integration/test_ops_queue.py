"""Queue tools against a running ktrelay: `queue list` shows each pending recipient's last deferral
reason (like mailq), `queue show` prints a queued message (like postcat -q), `queue hold|release|requeue
ID|ALL` (like postsuper -h, -H, -r), with a real next hop (Postfix's smtp-sink) appearing mid-test."""
import os
import re
import smtplib
import subprocess

import pytest

from conftest import BIN, wait_until
from test_ops_logs import Sink, SMTP_SINK, refusing_port

pytestmark = pytest.mark.skipif(not os.path.exists(SMTP_SINK), reason="needs Postfix's smtp-sink")


def send(port, rcpt, subject):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        reply = c.sendmail("alice@example.test", [rcpt], f"Subject: {subject}\r\n\r\nbody of {subject}\r\n")
    return reply


def qid_of(log, rcpt, status):
    m = re.findall(rf"([0-9A-F]+): to=<{re.escape(rcpt)}>, .*status={status}", log)
    return m[-1] if m else None


def test_list_show_hold_release_requeue(relay_factory, tmp_path, request):
    holder, closed = refusing_port()
    request.addfinalizer(holder.close)
    sink_holder, sink_port = refusing_port()
    (tmp_path / "transport").write_text(f"later.test smtp:[127.0.0.1]:{closed}\n"
                                        f"sink.test smtp:[127.0.0.1]:{sink_port}\n")
    r = relay_factory("mynetworks = 127.0.0.0/8\nqueue_directory = {dir}/queue\n"
                      f"transport_maps = texthash:{tmp_path}/transport\n")
    port = r.port()

    def q(*args):
        return subprocess.run([BIN, "queue", *args, "-c", str(r.dir)], capture_output=True, text=True)

    send(port, "x@later.test", "m1")
    send(port, "y@sink.test", "m2")
    m1 = wait_until(lambda: qid_of(r.log(), "x@later.test", "deferred"), 30)
    m2 = wait_until(lambda: qid_of(r.log(), "y@sink.test", "deferred"), 30)

    # list: both deferred (no "*"), each reason above its recipient
    out = wait_until(lambda: (lambda o: o if "Connection refused" in o and o.count("(") >= 2 else None)(q("list").stdout),
                     30)
    assert re.search(rf"^{m1}  +\d+ .* alice@example.test$", out, re.M), out
    assert re.search(rf"^ {{42}}\(connect to 127\.0\.0\.1\[127\.0\.0\.1\]:{closed}: Connection refused\)\n"
                     rf" {{43}}x@later\.test$", out, re.M), out
    assert out.endswith("Kbytes in 2 Requests.\n"), out

    # show: envelope and the message as queued
    out = q("show", m1).stdout
    assert out.startswith(f"*** ENVELOPE RECORDS new/{m1} ***\n")
    assert "sender: alice@example.test\n" in out
    assert re.search(r"recipient: x@later\.test \(pending\) connect to .*Connection refused\n", out), out
    assert f"*** MESSAGE CONTENTS new/{m1} ***\n" in out and "Subject: m1\n" in out and "body of m1\n" in out
    assert out.endswith(f"*** MESSAGE FILE END new/{m1} ***\n")
    assert q("show", "NOSUCHID").returncode == 66

    # hold m2, bring the next hop up, flush: m3 (new) goes out, m2 stays held
    p = q("hold", m2)
    assert p.returncode == 0 and f"{m2}: placed on hold" in p.stdout
    assert (r.dir / "queue" / "hold" / m2).exists() and not (r.dir / "queue" / "new" / m2).exists()
    assert re.search(rf"^{m2}!", q("list").stdout, re.M)
    assert r.wait_log(f"{m2}: placed on hold"), r.log()      # the running queue manager let go of it
    sink_holder.close()       # the next hop comes up on the port that refused until now
    sink = Sink(port=sink_port)
    try:
        deferrals_before = r.log().count(f"{m1}: to=<x@later.test>")
        assert q("flush").returncode == 0
        # the flush ran (m1 was tried again) ...
        wait_until(lambda: r.log().count(f"{m1}: to=<x@later.test>") > deferrals_before, 30)
        # ... and left the held message alone
        assert not qid_of(r.log(), "y@sink.test", "sent")
        p = q("release", m2)
        assert p.returncode == 0 and f"{m2}: released from hold" in p.stdout
        assert q("flush").returncode == 0
        assert wait_until(lambda: qid_of(r.log(), "y@sink.test", "sent"), 30) == m2

        # requeue m1: a new id, the same arrival, tried at once
        arrival = re.search(r"^arrival (\d+)$", (r.dir / "queue" / "new" / m1).read_text(errors="replace"), re.M)[1]
        p = q("requeue", m1)
        assert p.returncode == 0, p.stderr
        new = re.search(rf"{m1}: requeued as ([0-9A-F]+)", p.stdout)[1]
        assert new != m1 and not (r.dir / "queue" / "new" / m1).exists()
        assert r.wait_log(f"{m1}: requeued"), r.log()
        text = (r.dir / "queue" / "new" / new).read_text(errors="replace")
        assert f"arrival {arrival}\n" in text and "rcpt x@later.test\n" in text and "body of m1" in text
        wait_until(lambda: qid_of(r.log(), "x@later.test", "deferred") == new, 30)

        # ALL forms
        p = q("hold", "ALL")
        assert p.returncode == 0 and "Placed on hold: 1 message" in p.stdout
        p = q("release", "ALL")
        assert p.returncode == 0 and "Released from hold: 1 message" in p.stdout
        p = q("delete", "ALL")
        assert p.returncode == 0, p.stderr
        assert wait_until(lambda: q("list").stdout == "Mail queue is empty\n", 30)
    finally:
        sink.stop()
