"""smtpd_milters: ktrelay's milter client against real filters (python3-milter, opendkim) started here.

Every outcome is checked at the SMTP reply and in the stored file, byte for byte where ktrelay wrote it."""
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import SmtpConn, free_port, give_to_mail_owner, make_searchable, wait_until

MILTERS = pathlib.Path(__file__).resolve().parent / "milters"
PY = "/usr/bin/python3"


class PyMilter:
    """tests/integration/milters/actions.py with one action, on a loopback port or a unix socket."""

    def __init__(self, tmp, action, unix=False):
        self.record = tmp / f"record-{action}-{time.monotonic_ns()}.jsonl"
        self.record.write_text("")
        if unix:
            self.path = tmp / f"m-{time.monotonic_ns()}.sock"
            self.spec = f"unix:{self.path}"
            sock = f"unix:{self.path}"
        else:
            self.port = free_port()
            self.spec = f"inet:127.0.0.1:{self.port}"
            sock = f"inet:{self.port}@127.0.0.1"
        self.proc = subprocess.Popen([PY, str(MILTERS / "actions.py"), sock, action, str(self.record)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(self._ready, 10, f"milter {action} to listen")
        if unix:
            os.chmod(self.path, 0o666)
            make_searchable(tmp)

    def _ready(self):
        assert self.proc.poll() is None, self.proc.stderr.read().decode()
        try:
            if hasattr(self, "port"):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            else:
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(self.path))
                s.close()
            return True
        except OSError:
            return False

    def events(self, name=None):
        ev = [json.loads(line) for line in self.record.read_text().splitlines() if line]
        return [e for e in ev if name is None or e["event"] == name]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def milter(tmp_path):
    started = []

    def start(action, unix=False):
        m = PyMilter(tmp_path, action, unix)
        started.append(m)
        return m
    yield start
    for m in started:
        m.stop()


MSG = ("From: a@example.org\r\nTo: alice@example.test\r\nSubject: hello\r\nX-Remove: me\r\n"
       "Message-ID: <m1@example.org>\r\n\r\nbody line\r\n")


# what a final delivery from the session puts first (Postfix's virtual(8)); milters never see these
TRACE = b"Return-Path: <a@example.org>\r\nX-Original-To: alice@example.test\r\nDelivered-To: alice@example.test\r\n"


def send(port, rcpts=("alice@example.test",), msg=MSG, sender="a@example.org", expect_end=250):
    c = SmtpConn(port)
    c.ehlo()
    c.cmd(f"MAIL FROM:<{sender}>", 250)
    for r in rcpts:
        c.cmd(f"RCPT TO:<{r}>", 250)
    c.cmd("DATA", 354)
    c.send(msg + ".\r\n")
    end = c.reply()
    assert end.startswith(str(expect_end)), end
    c.quit()
    return end


def stored(relay, box):
    files = relay.maildir_files(box)
    assert len(files) == 1, files
    return files[0].read_bytes()


def split_received(data):
    """Our own Received: header (first, folded over several lines) and the rest of the message. Trace
    headers of the final delivery (Return-Path:, Delivered-To:, X-Original-To:) before it are skipped."""
    data = re.sub(rb"\A(?:(?:Return-Path|Delivered-To|X-Original-To): [^\r]*\r\n)*", b"", data)
    assert data.startswith(b"Received: "), data[:200]
    m = re.match(rb"Received: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*", data)
    return data[:m.end()], data[m.end():]


def test_events_and_macros_reach_the_milter(relay_factory, milter):
    m = milter("continue")
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    end = send(r.port())
    qid = end.split()[-1]
    data = stored(r, "example.test/alice/")
    _, rest = split_received(data)
    assert rest == MSG.encode()
    conn = m.events("connect")[0]
    assert conn["hostname"] == "[127.0.0.1]" and conn["addr"] == "127.0.0.1"
    assert conn["macros"]["j"] == "mx.example.test" and conn["macros"]["{daemon_name}"] == "mx.example.test"
    assert conn["macros"]["_"] == "unknown [127.0.0.1]"
    assert conn["macros"]["v"].startswith("ktrelay ")
    assert m.events("helo")[0]["name"] == "client.example.net"
    mail = m.events("mail")[0]
    assert mail["sender"] == "<a@example.org>" and mail["macros"] == {"i": qid, "{mail_addr}": "a@example.org"}
    rcpt = m.events("rcpt")[0]
    assert rcpt["rcpt"] == "<alice@example.test>" and rcpt["macros"] == {"i": qid, "{rcpt_addr}": "alice@example.test"}
    # our own Received: header is not shown to milters (Postfix, Sendmail)
    assert m.events("eoh")[0]["headers"] == [["From", "a@example.org"], ["To", "alice@example.test"],
                                             ["Subject", "hello"], ["X-Remove", "me"],
                                             ["Message-ID", "<m1@example.org>"]]
    assert m.events("eom")[0]["macros"] == {"i": qid}


def test_unix_socket_milter(relay_factory, milter):
    m = milter("addheader", unix=True)
    r = relay_factory(f"smtpd_milters = unix:{m.path}\n")
    send(r.port())
    assert b"X-Filter: one\r\n" in stored(r, "example.test/alice/")


def test_reject_mail_and_rcpt(relay_factory, milter):
    m = milter("reject-mail")
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    c = SmtpConn(r.port())
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@example.org>") == "550 5.7.1 Command rejected"
    c.quit()
    assert r.wait_log("NOQUEUE: milter-reject: MAIL from unknown[127.0.0.1]: 550 5.7.1 Command rejected; "
                      "from=<a@example.org> proto=ESMTP helo=<client.example.net>")

    m2 = milter("reject-rcpt")
    r2 = relay_factory(f"smtpd_milters = {m2.spec}\n")
    c = SmtpConn(r2.port())
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>", 250)
    # pipelined: the refusal replaces the 250 of the recipient it concerns only
    c.send("RCPT TO:<bad@localhost>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert c.reply() == "550 5.1.1 no such user here"
    assert c.reply() == "250 2.1.5 Ok"
    assert c.reply()[:3] == "354"
    c.send(MSG + ".\r\n")
    c.expect(250)
    c.quit()
    assert len(r2.maildir_files("example.test/alice/")) == 1
    assert r2.maildir_files("localhost/catchall/") == []


@pytest.mark.parametrize("action,reply", [
    ("reject", "550 5.7.1 Command rejected"),
    ("tempfail", "451 4.7.1 Service unavailable - try again later"),
    ("replycode", "550-5.7.1 first line\n550 5.7.1 second line"),
])
def test_end_of_message_refusals(relay_factory, milter, action, reply):
    m = milter(action)
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    c = SmtpConn(r.port())
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>", 250)
    c.cmd("RCPT TO:<alice@example.test>", 250)
    c.cmd("DATA", 354)
    c.send(MSG + ".\r\n")
    assert c.reply() == reply
    # the session goes on
    c.cmd("RSET", 250)
    c.quit()
    assert r.wait_log(f": milter-reject: END-OF-MESSAGE from unknown[127.0.0.1]: {reply.splitlines()[0][:3]}")
    assert r.maildir_files("example.test/alice/") == []
    assert r.maildir_files("example.test/alice/", "tmp") == []


def test_headers_added_inserted_changed_deleted(relay_factory, milter):
    m = milter("addheader")
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    send(r.port())
    data = stored(r, "example.test/alice/")
    # X-First at position 0 precedes even our own Received: header, as in Postfix (where the delivery
    # agent adds the trace headers later: they stay first)
    assert data.startswith(TRACE + b"X-First: zero\r\nReceived: ")
    _, rest = split_received(data[len(TRACE + b"X-First: zero\r\n"):])
    assert rest == (b"From: a@example.org\r\nTo: alice@example.test\r\nSubject: changed subject\r\n"
                    b"Message-ID: <m1@example.org>\r\nX-Filter: one\r\n\r\nbody line\r\n")
    name = r.maildir_files("example.test/alice/")[0].name
    assert f",S={len(data)},W={len(data)}" in name


def test_body_replaced(relay_factory, milter):
    m = milter("replacebody")
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    send(r.port())
    _, rest = split_received(stored(r, "example.test/alice/"))
    assert rest == MSG.split("\r\n\r\n")[0].encode() + b"\r\n\r\nnew body line 1\r\nnew body line 2\r\n"


def test_recipient_added_and_sender_changed(relay_factory, milter):
    m = milter("addrcpt")
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    send(r.port())
    # the changed envelope goes through the queue: both get the message
    wait_until(lambda: len(r.maildir_files("example.test/bob/")) == 1, 10, "delivery to the added recipient")
    wait_until(lambda: len(r.maildir_files("example.test/alice/")) == 1, 10, "delivery to alice")
    for user in ("alice", "bob"):
        data = stored(r, f"example.test/{user}/")
        # the trace headers are the queue manager's for each recipient; those the session had written for a
        # final delivery to alice alone were left out of the queued message
        trace = f"Return-Path: <a@example.org>\r\nX-Original-To: {user}@example.test\r\n" \
                f"Delivered-To: {user}@example.test\r\nReceived: "
        assert data.startswith(trace.encode()), data[:300]
        _, rest = split_received(data)
        assert rest == MSG.encode()

    m2 = milter("chgfrom")
    r2 = relay_factory(f"smtpd_milters = {m2.spec}\n")
    end = send(r2.port())
    qid = end.split()[-1]
    wait_until(lambda: len(r2.maildir_files("example.test/alice/")) == 1, 10, "delivery")
    assert r2.wait_log(f"{qid}: from=<new-sender@example.org>, size=")


def test_recipient_deleted(relay_factory, milter):
    m = milter("delrcpt")
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    send(r.port(), rcpts=("alice@example.test", "bob@example.test"))
    wait_until(lambda: len(r.maildir_files("example.test/bob/")) == 1, 10, "delivery to bob")
    assert r.maildir_files("example.test/alice/") == []


def test_quarantine_puts_the_message_on_hold(relay_factory, milter):
    m = milter("quarantine")
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    end = send(r.port())
    qid = end.split()[-1]
    assert r.wait_log(f"{qid}: milter-hold: END-OF-MESSAGE from unknown[127.0.0.1]: held by test;")
    held = r.dir / "queue" / "hold" / qid
    assert held.exists()
    assert held.read_bytes().endswith(MSG.encode())
    assert r.maildir_files("example.test/alice/") == []
    from conftest import BIN
    listing = subprocess.run([BIN, "queue", "-c", str(r.dir), "list"], capture_output=True, text=True, timeout=30)
    assert re.search(rf"^{qid}!", listing.stdout, re.M), listing.stdout


def test_discard(relay_factory, milter):
    m = milter("discard")
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    end = send(r.port())
    assert end.startswith("250 2.0.0 Ok: queued as ")
    assert r.wait_log("milter-discard: END-OF-MESSAGE from unknown[127.0.0.1]: milter triggers DISCARD action")
    assert r.maildir_files("example.test/alice/") == []
    assert r.maildir_files("example.test/alice/", "tmp") == []


def test_connect_reject(relay_factory, milter):
    m = milter("reject-connect")
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    c = SmtpConn(r.port())
    assert c.banner == "554 mx.example.test ESMTP not accepting connections"
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@example.org>") == "550 5.7.1 Command rejected"
    c.quit()


def test_milters_in_order_each_sees_the_previous_changes(relay_factory, milter):
    a, b = milter("chain-a"), milter("chain-b")
    r = relay_factory(f"smtpd_milters = {a.spec}, {{ {b.spec}, command_timeout=10s }}\n")
    send(r.port())
    _, rest = split_received(stored(r, "example.test/alice/"))
    assert rest.startswith(MSG.split("\r\n\r\n")[0].encode() + b"\r\nX-Chain: a\r\nX-Seen-Chain: a\r\n\r\n")


@pytest.mark.parametrize("action,first,stored_count", [
    ("tempfail", "451 4.7.1 Service unavailable - try again later", 0),
    ("reject", "550 5.5.0 Service unavailable", 0),
    ("accept", None, 1),
])
def test_milter_down_default_action(relay_factory, action, first, stored_count):
    port = free_port()   # nothing listens there
    r = relay_factory(f"smtpd_milters = inet:127.0.0.1:{port}\nmilter_default_action = {action}\n")
    c = SmtpConn(r.port())
    # as Postfix: a milter whose default answer is a 5xx refuses the connection's banner too
    assert c.banner == ("554 mx.example.test ESMTP not accepting connections" if action == "reject"
                        else "220 mx.example.test ESMTP ktrelay")
    c.ehlo()
    rep = c.cmd("MAIL FROM:<a@example.org>")
    if first:
        assert rep == first
        c.quit()
    else:
        assert rep == "250 2.1.0 Ok"
        c.cmd("RCPT TO:<alice@example.test>", 250)
        c.cmd("DATA", 354)
        c.send(MSG + ".\r\n")
        c.expect(250)
        c.quit()
    assert r.wait_log(f"warning: milter inet:127.0.0.1:{port}: connect: Connection refused")
    assert len(r.maildir_files("example.test/alice/")) == stored_count


@pytest.mark.parametrize("default,reply", [
    ("tempfail", "451 4.7.1 Service unavailable - try again later"),
    ("reject", "550 5.5.0 Service unavailable"),
    ("accept", None),
])
def test_milter_closes_mid_message(relay_factory, milter, default, reply):
    m = milter("close")
    r = relay_factory(f"smtpd_milters = {m.spec}\nmilter_default_action = {default}\n")
    c = SmtpConn(r.port())
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>", 250)
    c.cmd("RCPT TO:<alice@example.test>", 250)
    c.cmd("DATA", 354)
    c.send(MSG + ".\r\n")
    end = c.reply()
    c.quit()
    if reply:
        assert end == reply
        assert r.maildir_files("example.test/alice/") == []
    else:
        assert end.startswith("250 2.0.0 Ok: queued as ")
        _, rest = split_received(stored(r, "example.test/alice/"))
        assert rest == MSG.encode()
    assert r.maildir_files("example.test/alice/", "tmp") == []


def test_slow_milter_times_out_and_holds_only_its_session(relay_factory, milter):
    m = milter("slow")
    r = relay_factory(f"smtpd_milters = {m.spec}\nmilter_content_timeout = 2s\n",
                      services={"smtp": {}, "plain": {"smtpd_milters": ""}})
    c = SmtpConn(r.port())
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>", 250)
    c.cmd("RCPT TO:<alice@example.test>", 250)
    c.cmd("DATA", 354)
    t0 = time.monotonic()
    c.send(MSG + ".\r\n")
    c.wait_read_by_server()
    # meanwhile another session of the same worker process completes
    end2 = send(r.port("plain"), rcpts=("bob@example.test",))
    assert end2.startswith("250 ")
    assert time.monotonic() - t0 < 2
    assert c.reply() == "451 4.7.1 Service unavailable - try again later"
    assert time.monotonic() - t0 >= 1.9
    c.quit()
    assert r.wait_log(f"warning: milter {m.spec}: read timeout")
    assert r.maildir_files("example.test/alice/") == []
    assert len(r.maildir_files("example.test/bob/")) == 1


def test_bad_milter_settings_fail_closed(tmp_path):
    from conftest import BIN
    for value, err in [("smtpd_milters = inet:milter.example:8891", "numeric IP address"),
                       ("smtpd_milters = { inet:127.0.0.1:1, default_action=maybe }", "bad default_action"),
                       ("smtpd_milters = { inet:127.0.0.1:1, bogus=1 }", "unknown setting \"bogus\""),
                       ("smtpd_milters = tcp:127.0.0.1:1", "unsupported socket type"),
                       ("milter_default_action = bounce", "milter_default_action"),
                       ("milter_protocol = 7", "milter_protocol")]:
        d = tmp_path / str(abs(hash(value)))
        d.mkdir()
        (d / "main.cf").write_text(f"myhostname = mx.example.test\nqueue_directory = {d}/q\n"
                                   f"data_directory = {d}\nsmtpd_milters = inet:127.0.0.1:1\n{value}\n")
        (d / "master.cf").write_text("127.0.0.1:2599 inet n - n - - smtpd\n")
        chk = subprocess.run([BIN, "check-config", "-c", str(d)], capture_output=True, text=True, timeout=30)
        assert chk.returncode == 78, (value, chk.stderr)
        assert err in chk.stderr, (value, chk.stderr)


def test_bdat_message_goes_through_the_milter(relay_factory, milter):
    m = milter("addheader")
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    c = SmtpConn(r.port())
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>", 250)
    c.cmd("RCPT TO:<alice@example.test>", 250)
    body = MSG.encode()
    c.send(b"BDAT %d LAST\r\n" % len(body) + body)
    assert c.reply().startswith("250 2.0.0 Ok: queued as ")
    c.quit()
    data = stored(r, "example.test/alice/")
    assert b"\r\nX-Filter: one\r\n\r\nbody line\r\n" in data and b"Subject: changed subject\r\n" in data
    assert m.events("eoh")[0]["headers"][0] == ["From", "a@example.org"]


class OpenDkim:
    """opendkim started here as a signing (mode s, key made by opendkim-genkey) or verifying (mode v, the
    public key through TestPublicKeys instead of DNS) milter on a loopback port."""

    def __init__(self, tmp, mode):
        self.dir = tmp / "dkim"
        self.dir.mkdir(exist_ok=True)
        if not (self.dir / "test.private").exists():
            subprocess.run(["opendkim-genkey", "-D", str(self.dir), "-d", "example.org", "-s", "test"], check=True)
            txt = (self.dir / "test.txt").read_text()
            (self.dir / "keys").write_text("test._domainkey.example.org " + "".join(re.findall(r'"([^"]*)"', txt))
                                           + "\n")
        self.port = free_port()
        self.spec = f"inet:127.0.0.1:{self.port}"
        self.conf = self.dir / f"{mode}.conf"
        common = (f"Socket inet:{self.port}@127.0.0.1\nBackground no\nSyslog no\nRequireSafeKeys no\n"
                  f"PidFile {self.dir}/{mode}.pid\nTestPublicKeys {self.dir}/keys\n")
        if mode == "s":
            self.conf.write_text(common + f"Mode s\nDomain example.org\nSelector test\nKeyFile {self.dir}/test.private\n"
                                 "Canonicalization relaxed/simple\n")
        else:
            self.conf.write_text(common + "Mode v\nAuthservID verifier.example.test\n")
        self.proc = subprocess.Popen(["opendkim", "-f", "-x", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_until(self._ready, 10, "opendkim to listen")

    def _ready(self):
        assert self.proc.poll() is None, self.proc.stderr.read().decode()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.mark.skipif(shutil.which("opendkim") is None, reason="opendkim is not installed")
def test_opendkim_signs_and_the_signature_verifies(relay_factory, tmp_path):
    signer = OpenDkim(tmp_path, "s")
    verifier = OpenDkim(tmp_path, "v")
    try:
        # the verifier after the signer sees the signed message (milters in order, as Postfix)
        r = relay_factory(f"smtpd_milters = {signer.spec}, {verifier.spec}\n")
        msg = ("From: Alice <a@example.org>\r\nTo: alice@example.test\r\nSubject: signed\r\n"
               "Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <dkim1@example.org>\r\n\r\n"
               "line one\r\n..dot-stuffed line\r\n\r\nlast line\r\n")
        send(r.port(), msg=msg)
        f = r.maildir_files("example.test/alice/")
        assert len(f) == 1
        data = f[0].read_bytes()
        # both insert their header at position 0, before ktrelay's Received: (as with Postfix)
        assert data.startswith(TRACE)
        assert re.match(rb"(?:[^\r]*\r\n){3}Authentication-Results: [^\r]*\r\n(?:\t[^\r]*\r\n)*DKIM-Signature: v=1; a=rsa-sha256; "
                        rb"c=relaxed/simple; d=example.org; s=test;\r\n\tt=\d+; bh=[^\r]*\r\n\th=From:To:Subject:Date;\r\n\tb=", data), \
            data[:600]
        assert re.search(rb"Authentication-Results: verifier.example.test;\r\n\tdkim=pass \(2048-bit key\) "
                         rb"header.d=example.org header.i=@example.org header.a=rsa-sha256 header.s=test header.b=", data), data[:1200]
        assert data.endswith(b"\r\n\r\nline one\r\n.dot-stuffed line\r\n\r\nlast line\r\n")
        # and opendkim's own test mode verifies the stored file (a copy: -t takes a comma-separated list)
        copy = tmp_path / "stored.eml"
        copy.write_bytes(data)
        chk = subprocess.run(["opendkim", "-x", str(verifier.conf), "-t", str(copy)], capture_output=True, text=True,
                             timeout=30)
        assert chk.returncode == 0, chk.stderr
        assert "verification (s=test, d=example.org, 2048-bit key) succeeded" in chk.stdout + chk.stderr, chk.stdout
    finally:
        signer.stop()
        verifier.stop()


def test_large_body_without_replies_reaches_the_milter_whole(relay_factory, milter):
    """Headers and body events without replies (SMFIP_NR_*) leave in batches; a body larger than the
    spool's memory buffer is read back from the file in 64 KB packets."""
    import hashlib
    m = milter("count")
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    body = "".join(f"line {i:07d} " + "x" * 60 + "\r\n" for i in range(9000))   # about 650 KB
    send(r.port(), msg=MSG.split("\r\n\r\n")[0] + "\r\n\r\n" + body)
    eom = m.events("eom")[0]
    assert eom["size"] == len(body) and eom["sha256"] == hashlib.sha256(body.encode()).hexdigest()
    assert eom["headers"] == 5
    _, rest = split_received(stored(r, "example.test/alice/"))
    assert rest == (MSG.split("\r\n\r\n")[0] + "\r\n\r\n" + body).encode()


def test_unknown_command_goes_to_the_milter(relay_factory, milter):
    m = milter("reject-unknown")
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    c = SmtpConn(r.port())
    c.ehlo()
    assert c.cmd("XFOO bar baz") == "550 5.5.1 say what"
    c.quit()
    assert m.events("unknown")[0]["cmd"] == "XFOO bar baz"
    m2 = milter("continue")
    r2 = relay_factory(f"smtpd_milters = {m2.spec}\n")
    c = SmtpConn(r2.port())
    assert c.cmd("XFOO") == "502 5.5.2 Error: command not recognized"
    c.quit()


def test_later_milters_stay_in_step_when_an_earlier_one_refuses(relay_factory, milter):
    first, second = milter("reject"), milter("continue")
    r = relay_factory(f"smtpd_milters = {first.spec}, {second.spec}\n")
    c = SmtpConn(r.port())
    c.ehlo()
    for _ in range(2):
        c.cmd("MAIL FROM:<a@example.org>", 250)
        c.cmd("RCPT TO:<alice@example.test>", 250)
        c.cmd("DATA", 354)
        c.send(MSG + ".\r\n")
        assert c.reply() == "550 5.7.1 Command rejected"
    c.quit()
    # the second milter never saw a message's end, and its conversation went on with the next MAIL (after
    # an SMFIC_ABORT, which libmilter would also infer by itself)
    assert second.events("eom") == []
    assert len(second.events("abort")) >= 1 and len(second.events("mail")) == 2
