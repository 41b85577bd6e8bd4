"""After-queue content filtering (Postfix's FILTER_README, the Amavis pattern): content_filter =
smtp:[127.0.0.1]:PORT on the receiving service sends every message, all recipients, through the queue to
an SMTP filter, which this test runs in Python: it adds a header and re-injects the message into a second
ktrelay service with "-o content_filter=" that delivers normally. Also: the filter down (deferred, not
lost, delivered once it is back), FILTER from an access table, and remote virtual alias targets
relayed through the queue."""
import re
import smtplib
import subprocess

import pytest

from conftest import BIN, SmtpConn, free_port, made_by_test, make_searchable, wait_until
from peers import TcpPeer, read_data_lines


class SmtpPeer(TcpPeer):
    """A small SMTP server on 127.0.0.1:port, one thread per connection. Each message is recorded as
    (sender, recipients, data); with reinject=PORT it is first sent on, with an X-Filtered header
    prepended, to 127.0.0.1:PORT, and the client gets that server's answer (as Amavis does)."""

    def __init__(self, port, reinject=None):
        super().__init__(port=port, reuse_addr=True)
        self.reinject = reinject
        self.messages = []
        self.listen()

    def session(self, conn):
        f = conn.makefile("rb")
        out = lambda s: conn.sendall(s.encode() + b"\r\n")  # noqa: E731
        try:
            out("220 filter.example ESMTP")
            sender, rcpts = None, []
            while True:
                line = f.readline()
                if not line:
                    return
                cmd = line.decode().rstrip("\r\n")
                verb = cmd[:4].upper()
                if verb in ("EHLO", "HELO"):
                    out("250-filter.example\r\n250 8BITMIME" if verb == "EHLO" else "250 filter.example")
                elif verb == "MAIL":
                    sender, rcpts = re.search(r"<(.*?)>", cmd).group(1), []
                    out("250 2.1.0 Ok")
                elif verb == "RCPT":
                    rcpts.append(re.search(r"<(.*?)>", cmd).group(1))
                    out("250 2.1.5 Ok")
                elif verb == "DATA":
                    out("354 go ahead")
                    data = b"".join(l[1:] if l.startswith(b"..") else l for l in read_data_lines(f)[0])
                    out(self._message(sender, rcpts, data))
                elif verb == "RSET":
                    sender, rcpts = None, []
                    out("250 2.0.0 Ok")
                elif verb == "QUIT":
                    out("221 2.0.0 Bye")
                    return
                else:
                    out("250 2.0.0 Ok")
        except OSError:
            pass
        finally:
            conn.close()

    def _message(self, sender, rcpts, data):
        with self.lock:
            self.messages.append((sender, list(rcpts), data))
        if not self.reinject:
            return "250 2.0.0 Ok: recorded"
        try:
            with smtplib.SMTP("127.0.0.1", self.reinject, timeout=20) as s:
                s.sendmail(sender, rcpts, b"X-Filtered: yes\r\n" + data)
        except smtplib.SMTPException as e:
            return f"451 4.3.0 re-injection failed: {e}"
        return "250 2.0.0 Ok: filtered and re-injected"


# Postfix's FILTER_README re-injection service, with the -o lines ktrelay implements
REINJECT = {
    "content_filter": "",
    "receive_override_options": "no_unknown_recipient_checks,no_header_body_checks,no_milters",
    "smtpd_helo_restrictions": "",
    "smtpd_client_restrictions": "",
    "smtpd_sender_restrictions": "",
    "smtpd_recipient_restrictions": "permit_mynetworks,reject",
    "smtpd_relay_restrictions": "permit_mynetworks,reject",
    "mynetworks": "127.0.0.0/8",
    "smtpd_error_sleep_time": "0",
    "smtpd_soft_error_limit": "1001",
    "smtpd_hard_error_limit": "1000",
    "smtpd_client_connection_count_limit": "0",
    "smtpd_client_connection_rate_limit": "0",
}

QUEUE_CF = """\
minimal_backoff_time = 1s
maximal_backoff_time = 2s
queue_run_delay = 1s
smtp_connect_timeout = 5s
"""


@pytest.fixture
def peers():
    yield from made_by_test(SmtpPeer)


def send(port, rcpts, body="Subject: t\r\nMessage-ID: <cf@example.org>\r\n\r\nhello\r\n",
         sender="s@sender.example"):
    c = SmtpConn(port)
    c.ehlo()
    c.cmd(f"MAIL FROM:<{sender}>", 250)
    for r in rcpts:
        c.cmd(f"RCPT TO:<{r}>", 250)
    c.cmd("DATA", 354)
    c.send(body + ".\r\n")
    end = c.expect(250)
    c.quit()
    return end.split()[-1]


def box(relay, name):
    return relay.maildir_files(f"example.test/{name}/")


def test_content_filter_amavis_pattern(relay_factory, peers):
    fport = free_port()
    r = relay_factory(QUEUE_CF, services={"smtp": {"content_filter": f"smtp:[127.0.0.1]:{fport}"},
                                          "reinject": REINJECT})
    flt = peers(fport, reinject=r.port("reinject"))
    qid = send(r.port(), ["alice@example.test", "bob@example.test"])
    # not into the Maildirs at the end of data: into the queue, then to the filter
    wait_until(lambda: len(box(r, "alice")) == 1 and len(box(r, "bob")) == 1, 15, "the filtered copies")
    assert len(flt.messages) == 1
    sender, rcpts, data = flt.messages[0]
    assert sender == "s@sender.example" and sorted(rcpts) == ["alice@example.test", "bob@example.test"]
    assert b"X-Filtered" not in data and data.endswith(b"\r\nhello\r\n")
    for name in ("alice", "bob"):
        stored = box(r, name)[0].read_bytes()
        assert stored.count(b"X-Filtered: yes\r\n") == 1 and stored.endswith(b"\r\nhello\r\n")
    # the filter answers once the re-injected copies are stored; the first pass logs after that answer
    wait_until(lambda: re.search(rf"{qid}: to=<alice@example.test>, relay=127.0.0.1\[127.0.0.1\]:{fport}, "
                                 rf".*status=sent", r.log()), 10, "the first pass's delivery to the filter")
    # the first pass never delivers locally: exactly one copy each, the filtered one
    assert f"{qid}: to=<alice@example.test>, relay=virtual" not in r.log()
    wait_until(lambda: r.log().count("relay=virtual") == 2, 10, "two virtual deliveries")
    assert not any(f"{qid}: to=<{a}>, relay=virtual" in r.log() for a in ("alice@example.test", "bob@example.test"))


def test_filter_down_defers_then_delivers(relay_factory, peers, tmp_path):
    fport = free_port()
    r = relay_factory(QUEUE_CF, services={"smtp": {"content_filter": f"smtp:[127.0.0.1]:{fport}"},
                                          "reinject": REINJECT})
    qid = send(r.port(), ["alice@example.test"])
    assert r.wait_log(f"{qid}: to=<alice@example.test>, relay=none", timeout=15)
    assert re.search(rf"{qid}: to=<alice@example.test>, relay=none, .*status=deferred \(connect to "
                     rf"127.0.0.1\[127.0.0.1\]:{fport}: Connection refused\)", r.log())
    assert box(r, "alice") == []
    show = subprocess.run([BIN, "queue", "-c", str(r.dir), "show", qid], capture_output=True, text=True)
    assert f"content_filter: smtp:[127.0.0.1]:{fport}\n" in show.stdout, show.stdout
    # the filter comes back: the retry goes through it, once
    peers(fport, reinject=r.port("reinject"))
    wait_until(lambda: len(box(r, "alice")) == 1, 20, "the retried message")
    assert box(r, "alice")[0].read_bytes().count(b"X-Filtered: yes\r\n") == 1
    assert r.wait_log(f"{qid}: removed", timeout=10)


def test_filter_from_access_table(relay_factory, peers, tmp_path):
    fport = free_port()
    access = tmp_path / "rcpt_access"
    access.write_text(f"bob@example.test FILTER smtp:[127.0.0.1]:{fport}\n")
    make_searchable(access)
    r = relay_factory(QUEUE_CF + f"smtpd_recipient_restrictions = check_recipient_access texthash:{access}\n",
                      services={"smtp": {}, "reinject": REINJECT})
    flt = peers(fport, reinject=r.port("reinject"))
    direct = send(r.port(), ["alice@example.test"])
    assert len(box(r, "alice")) == 1 and flt.messages == []        # straight into the Maildir
    assert f"{direct}: to=<alice@example.test>, relay=virtual" in r.log()
    filtered = send(r.port(), ["alice@example.test", "bob@example.test"])
    # FILTER applies to the whole message, every recipient
    wait_until(lambda: len(box(r, "alice")) == 2 and len(box(r, "bob")) == 1, 15, "the filtered copies")
    assert len(flt.messages) == 1 and sorted(flt.messages[0][1]) == ["alice@example.test", "bob@example.test"]
    assert re.search(rf"{filtered}: filter: RCPT from unknown\[127.0.0.1\]: <bob@example.test>: triggers FILTER "
                     rf"smtp:\[127.0.0.1\]:{fport};", r.log())
    assert box(r, "bob")[0].read_bytes().count(b"X-Filtered: yes\r\n") == 1


def test_remote_alias_target_goes_through_the_queue(relay_factory, peers, tmp_path):
    sport = free_port()
    sink = peers(sport)
    valias = tmp_path / "valias"
    valias.write_text("far@alias.test someone@remote.test, alice@example.test\n")
    make_searchable(valias)
    r = relay_factory(QUEUE_CF + f"virtual_alias_domains = alias.test\nvirtual_alias_maps = texthash:{valias}\n"
                      f"relayhost = [127.0.0.1]:{sport}\n")
    qid = send(r.port(), ["far@alias.test"])
    wait_until(lambda: len(sink.messages) == 1 and len(box(r, "alice")) == 1, 15, "both copies")
    assert sink.messages[0][1] == ["someone@remote.test"]
    # the file is in new/ a moment before the delivery is logged
    wait_until(lambda: f"{qid}: to=<alice@example.test>, orig_to=<far@alias.test>, relay=virtual" in r.log(), 10,
               "the local delivery's log line")
    assert re.search(rf"{qid}: to=<someone@remote.test>, orig_to=<far@alias.test>, relay=127.0.0.1\[127.0.0.1\]:"
                     rf"{sport}, .*status=sent", r.log()), r.log()


def test_main_cf_content_filter_applies_to_sendmail(relay_factory, peers):
    """content_filter in main.cf: every service but the re-injection one, and local submissions too (as
    Postfix's pickup)."""
    fport = free_port()
    r = relay_factory(QUEUE_CF + f"content_filter = smtp:[127.0.0.1]:{fport}\n",
                      services={"smtp": {}, "reinject": REINJECT})
    flt = peers(fport, reinject=r.port("reinject"))
    p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), "-f", "root@example.test", "bob@example.test"],
                       input=b"Subject: cron\n\nhi\n", capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    send(r.port(), ["alice@example.test"])
    wait_until(lambda: len(box(r, "alice")) == 1 and len(box(r, "bob")) == 1, 15, "the filtered copies")
    assert len(flt.messages) == 2
    for name in ("alice", "bob"):
        assert box(r, name)[0].read_bytes().count(b"X-Filtered: yes\r\n") == 1


def test_reinjection_skips_header_checks(relay_factory, peers, tmp_path):
    """receive_override_options = no_header_body_checks on the re-injection service: the checks ran on
    the way in and do not run again on what the filter hands back (here they would refuse its header)."""
    fport = free_port()
    hc = tmp_path / "header_checks"
    hc.write_text("/^X-Filtered:/ REJECT seen by the checks after the filter\n")
    make_searchable(hc)
    r = relay_factory(QUEUE_CF + f"header_checks = regexp:{hc}\n",
                      services={"smtp": {"content_filter": f"smtp:[127.0.0.1]:{fport}"}, "reinject": REINJECT})
    flt = peers(fport, reinject=r.port("reinject"))
    send(r.port(), ["alice@example.test"])
    wait_until(lambda: len(box(r, "alice")) == 1, 15, "the filtered copy")
    assert len(flt.messages) == 1
    assert box(r, "alice")[0].read_bytes().count(b"X-Filtered: yes\r\n") == 1
    assert "seen by the checks after the filter" not in r.log()
