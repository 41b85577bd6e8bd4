"""Attacks on the milter client by a hostile or broken filter: malformed and oversized packets, replies out
of order, replies that would inject lines into the SMTP conversation or the queue file, modifications that
were never negotiated, filters that close at every stage.

The filter here is a raw implementation of the Sendmail milter protocol (RawMilter), so it can say what no
libmilter would; each test states what it answers and checks the SMTP reply, the log and the stored files."""
import socket
import struct
import threading
import time

import pytest

from conftest import SmtpConn, wait_until

MSG = ("From: a@example.org\r\nTo: alice@example.test\r\nSubject: hello\r\n"
       "Message-ID: <m1@example.org>\r\n\r\nbody line\r\n")
TEMPFAIL = "451 4.7.1 Service unavailable - try again later"


def pkt(cmd, data=b""):
    return struct.pack(">I", len(data) + 1) + cmd + data


class RawMilter:
    """A milter speaking the wire protocol directly. `answers` maps a command byte (b"O", b"C", b"H", b"M",
    b"R", b"T", b"L", b"N", b"B", b"E") to the bytes sent back, or to a function of the packet data that
    returns them; None closes the connection. Unlisted events get SMFIR_CONTINUE; SMFIC_OPTNEG gets
    version 6, every action and no protocol flags unless `optneg` says otherwise."""

    def __init__(self, answers=None, optneg=None):
        self.answers = answers or {}
        self.optneg = optneg if optneg is not None else pkt(b"O", struct.pack(">III", 6, 0x1ff, 0))
        self.seen = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.spec = f"inet:127.0.0.1:{self.port}"
        self.conns = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _recv(c, n):
        b = b""
        while len(b) < n:
            chunk = c.recv(n - len(b))
            if not chunk:
                raise EOFError
            b += chunk
        return b

    def _serve(self, c):
        try:
            while True:
                (n,) = struct.unpack(">I", self._recv(c, 4))
                p = self._recv(c, n)
                cmd, data = p[:1], p[1:]
                self.seen.append(cmd)
                if cmd in (b"D", b"A"):
                    continue
                if cmd == b"Q":
                    break
                ans = self.answers.get(cmd, pkt(b"c")) if cmd != b"O" else self.answers.get(b"O", self.optneg)
                if callable(ans):
                    ans = ans(data)
                if ans is None:
                    break
                if isinstance(ans, bytes):
                    c.sendall(ans)
                else:
                    for part in ans:   # a generator: it may sleep between its packets
                        c.sendall(part)
        except (EOFError, OSError):
            pass
        finally:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def stop(self):
        self.stopped = True
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def raw_milter():
    started = []

    def start(answers=None, optneg=None):
        m = RawMilter(answers, optneg)
        started.append(m)
        return m
    yield start
    for m in started:
        m.stop()


def transaction(port, msg=MSG, rcpts=("alice@example.test",)):
    """MAIL, RCPT, DATA and the message: the reply to the final dot. The session must go on afterwards."""
    c = SmtpConn(port)
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>", 250)
    for r in rcpts:
        c.cmd(f"RCPT TO:<{r}>", 250)
    c.cmd("DATA", 354)
    c.send(msg + ".\r\n")
    end = c.reply()
    # nothing more than that one reply may come: RSET gets exactly its own 250
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    c.quit()
    return end


def nothing_stored(r):
    for box in ("example.test/alice/", "example.test/bob/", "localhost/catchall/"):
        assert r.maildir_files(box) == [] and r.maildir_files(box, "tmp") == []
    assert not any((r.dir / "queue" / d).exists() and any((r.dir / "queue" / d).iterdir())
                   for d in ("new", "hold"))


# ---- replies the SMTP client would see ----

@pytest.mark.parametrize("code", [
    b"550 5.7.1 refused\r\n250 2.0.0 Ok: queued as FAKE",     # a second reply injected after the first
    b"550-5.7.1 first\r\n250 2.0.0 second",                   # a continuation with another code
    b"550 5.7.1 bare\nLF",
    b"550 5.7.1 bare\rCR",
    b"550 4.7.1 class differs from the code",
    b"250 2.0.0 a success code",
    b"55",
])
def test_malformed_reply_code_gets_the_default_action(relay_factory, raw_milter, code):
    m = raw_milter({b"E": pkt(b"y", code + b"\0")})
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    assert transaction(r.port()) == TEMPFAIL
    assert r.wait_log(f"warning: milter {m.spec}: malformed reply: ")
    nothing_stored(r)


def test_multiline_reply_code_is_passed_on(relay_factory, raw_milter):
    m = raw_milter({b"E": pkt(b"y", b"550-5.7.1 first line\r\n550 5.7.1 second line\0")})
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    assert transaction(r.port()) == "550-5.7.1 first line\n550 5.7.1 second line"
    nothing_stored(r)


# ---- negotiation ----

@pytest.mark.parametrize("optneg, extra, warning", [
    (pkt(b"O", b"\0\0\0\6"), "", ""),                                  # too short
    (pkt(b"c"), "", ""),                                                # not a negotiation reply
    (struct.pack(">I", 0xfffffff0) + b"O", "", ""),                     # length near 2^32
    (struct.pack(">I", 0), "", ""),                                     # empty packet
    (pkt(b"O", struct.pack(">III", 1, 0x1ff, 0)), "", ""),              # version 1
    # a protocol version the MTA did not offer
    (pkt(b"O", struct.pack(">III", 6, 0x1f, 0)), "milter_protocol = 2\n",
     "protocol version 6 conflict with MTA protocol version 2"),
    # actions the MTA did not offer
    (pkt(b"O", struct.pack(">III", 6, 0x3ff, 0)), "", "request mask 0x3ff conflict with MTA request mask 0x1ff"),
], ids=["short", "not-negotiation", "huge-length", "empty", "version-1", "version-not-offered",
        "actions-not-offered"])
def test_bad_negotiation_gets_the_default_action(relay_factory, raw_milter, optneg, extra, warning):
    m = raw_milter(optneg=optneg)
    r = relay_factory(f"smtpd_milters = {m.spec}\n{extra}")
    c = SmtpConn(r.port())
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@example.org>") == TEMPFAIL
    c.quit()
    assert r.wait_log(f"warning: milter {m.spec}: {warning}")
    assert b"T" not in m.seen and b"M" not in m.seen


def test_macro_list_in_negotiation_without_terminator(relay_factory, raw_milter):
    # SMFIR_SETSYMLIST: stage 2 (MAIL) wants "{mail_addr}", then a stage number without its list
    m = raw_milter(optneg=pkt(b"O", struct.pack(">III", 6, 0x1ff, 0) + struct.pack(">I", 2) + b"{mail_addr}\0"
                              + struct.pack(">I", 3) + b"{rcpt_addr}"))
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    assert transaction(r.port()).startswith("250 2.0.0 Ok: queued as ")


# ---- the milter goes away or says nonsense at each stage ----

@pytest.mark.parametrize("stage", [b"O", b"C", b"H", b"M", b"R", b"T", b"L", b"N", b"B", b"E"])
@pytest.mark.parametrize("how", ["close", "oversized", "garbage", "out-of-order"])
def test_milter_breaks_at_each_stage(relay_factory, raw_milter, stage, how):
    answer = {"close": None,
              "oversized": struct.pack(">I", 0xffffffff) + b"c",
              "garbage": pkt(b"Z", b"junk"),
              # a modification before the end of the message, or a negotiation reply later on
              "out-of-order": (pkt(b"h", b"X-Early\0yes\0") if stage != b"E"
                               else pkt(b"O", struct.pack(">III", 6, 0x1ff, 0))),
              }[how]
    m = raw_milter({stage: answer})
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    c = SmtpConn(r.port())
    c.ehlo()
    rep = c.cmd("MAIL FROM:<a@example.org>")
    if stage in (b"O", b"C", b"H", b"M"):
        assert rep == TEMPFAIL
    else:
        assert rep == "250 2.1.0 Ok"
        rep = c.cmd("RCPT TO:<alice@example.test>")
        if stage == b"R":
            assert rep == TEMPFAIL
        else:
            assert rep == "250 2.1.5 Ok"
            rep = c.cmd("DATA")
            if stage == b"T":
                assert rep == TEMPFAIL
            else:
                assert rep.startswith("354 ")
                c.send(MSG + ".\r\n")
                assert c.reply() == TEMPFAIL
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    c.quit()
    assert r.wait_log(f"warning: milter {m.spec}: ")
    nothing_stored(r)


# ---- modifications ----

def eom(*mods):
    return b"".join(mods) + pkt(b"c")


@pytest.mark.parametrize("mod", [
    pkt(b"m", struct.pack(">I", 1) + b"Bad:Name\0value\0"),
    pkt(b"m", struct.pack(">I", 1) + b"Bad Name\0value\0"),
    pkt(b"m", struct.pack(">I", 1) + b"\0value\0"),
    pkt(b"h", b"Bad\x7fName\0value\0"),
    pkt(b"h", b"X-No-Value-Terminator\0value"),
    pkt(b"i", b"\0\0"),                                          # too short for the index
    pkt(b"+", b"<x@example.test>\r\nrcpt bob@example.test\0"),  # would add a line to the queue file
    pkt(b"+", b"x@example.test\nfilter smtp:[127.0.0.1]:9\0"),
    pkt(b"e", b"<a@example.org>\nrcpt bob@example.test\0"),
    pkt(b"e", b"<a@example.org\r>\0"),
    pkt(b"+", b"<" + b"a" * 1000 + b"@example.test>\0"),       # longer than an address may be
    pkt(b"-", b"<alice@example.test\n>\0"),
])
def test_malformed_modification_gets_the_default_action(relay_factory, raw_milter, mod):
    m = raw_milter({b"E": eom(mod)})
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    assert transaction(r.port()) == TEMPFAIL
    assert r.wait_log(f"warning: milter {m.spec}: ")
    nothing_stored(r)


def test_header_value_line_breaks_stay_inside_the_header(relay_factory, raw_milter):
    m = raw_milter({b"E": eom(pkt(b"h", b"X-A\0one\nInjected: yes\0"),
                              pkt(b"h", b"X-B\0two\r\n\r\nbody?\0"),
                              pkt(b"h", b"X-C\0nul\0after\0"),
                              pkt(b"h", b"X-D\0folded\n\tproperly\0"))})
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    assert transaction(r.port()).startswith("250 2.0.0 Ok: queued as ")
    data = r.maildir_files("example.test/alice/")[0].read_bytes()
    head, body = data.split(b"\r\n\r\n", 1)
    head += b"\r\n"
    assert body == b"body line\r\n"
    assert b"\r\nInjected:" not in head and b"\r\nbody?" not in head
    assert b"X-A: one\r\n\tInjected: yes\r\n" in head
    assert b"X-C: nul\r\n" in head
    assert b"X-D: folded\r\n\tproperly\r\n" in head
    for line in head.split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line and b"\0" not in line


def test_change_header_beyond_the_last_adds_it(relay_factory, raw_milter):
    # Sendmail and Postfix: changing the n-th occurrence of a header that has fewer adds it
    m = raw_milter({b"E": eom(pkt(b"m", struct.pack(">I", 1000) + b"Subject\0second\0"),
                              pkt(b"m", struct.pack(">I", 7) + b"X-Absent\0\0"))})
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    assert transaction(r.port()).startswith("250 2.0.0 Ok: queued as ")
    data = r.maildir_files("example.test/alice/")[0].read_bytes()
    assert b"Subject: hello\r\n" in data and b"Subject: second\r\n" in data and b"X-Absent" not in data


def test_replaced_body_is_bounded_by_message_size_limit(relay_factory, raw_milter):
    chunk = b"x" * 65000 + b"\r\n"
    m = raw_milter({b"E": lambda _: b"".join(pkt(b"b", chunk) for _ in range(40)) + pkt(b"c")})
    r = relay_factory(f"smtpd_milters = {m.spec}\nmessage_size_limit = 1000000\n")
    assert transaction(r.port()) == "552 5.3.4 Error: message file too big"
    nothing_stored(r)


def test_replaced_body_within_message_size_limit(relay_factory, raw_milter):
    chunk = b"y" * 998 + b"\r\n"
    m = raw_milter({b"E": lambda _: b"".join(pkt(b"b", chunk) for _ in range(500)) + pkt(b"c")})
    r = relay_factory(f"smtpd_milters = {m.spec}\nmessage_size_limit = 1000000\n")
    assert transaction(r.port()).startswith("250 2.0.0 Ok: queued as ")
    data = r.maildir_files("example.test/alice/")[0].read_bytes()
    assert data.split(b"\r\n\r\n", 1)[1] == chunk * 500


def test_change_sender_with_esmtp_arguments(relay_factory, raw_milter):
    m = raw_milter({b"E": eom(pkt(b"e", b"<new@example.org>\0SIZE=10 BODY=8BITMIME\0"))})
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    assert transaction(r.port()).startswith("250 2.0.0 Ok: queued as ")
    assert r.wait_log("ignoring ESMTP arguments \"SIZE=10 BODY=8BITMIME\"")
    assert r.wait_log("from=<new@example.org>", timeout=10)


def test_null_and_unbracketed_recipients(relay_factory, raw_milter):
    m = raw_milter({b"E": eom(pkt(b"+", b"<>\0"), pkt(b"+", b"bob@example.test\0"))})
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    assert transaction(r.port()).startswith("250 2.0.0 Ok: queued as ")
    assert r.wait_log("to=<bob@example.test>", timeout=15)
    assert r.wait_log("to=<alice@example.test>", timeout=15)


def test_progress_forever_is_bounded(relay_factory, raw_milter):
    def progress(_):
        while True:            # SMFIR_PROGRESS every half second, never a decision
            yield pkt(b"p")
            time.sleep(0.5)
    m = raw_milter({b"E": progress})
    r = relay_factory(f"smtpd_milters = {{ {m.spec}, content_timeout=1s }}\n")
    t0 = time.monotonic()
    assert transaction(r.port()) == TEMPFAIL
    assert 4 <= time.monotonic() - t0 < 10
    assert r.wait_log(f"warning: milter {m.spec}: no decision within 4 s (4 times the timeout) of progress reports")
    nothing_stored(r)


def test_many_added_headers_are_bounded(relay_factory, raw_milter):
    big = b"v" * 60000
    m = raw_milter({b"E": lambda _: b"".join(pkt(b"h", b"X-Big\0" + big + b"\0") for _ in range(40)) + pkt(b"c")})
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    assert transaction(r.port()) == TEMPFAIL
    assert r.wait_log(f"warning: milter {m.spec}: bad or not negotiated modification 'h'")
    nothing_stored(r)


# ---- FILTER and content_filter next hops ----

@pytest.mark.parametrize("how,nexthop", [
    ("filter", "[127.0.0.1]:70000"),
    ("filter", "[127.0.0.1]:0"),
    ("filter", "[127.0.0.1"),
    ("content_filter", "[127.0.0.1]:1002x"),
])
def test_next_hop_with_a_bad_port_defers_rather_than_port_25(relay_factory, tmp_path, how, nexthop):
    # before: the port fell back to 25, so a typo in a filter's port sent the mail around the filter (here
    # to ourselves: bounced as a mail loop)
    extra = "minimal_backoff_time = 1s\nmaximal_backoff_time = 2s\nqueue_run_delay = 1s\n"
    services = None
    if how == "filter":
        (tmp_path / "hc").write_text(f"/^Subject: filter me/ FILTER smtp:{nexthop}\n")
        extra += f"header_checks = pcre:{tmp_path}/hc\n"
    else:
        services = {"smtp": {"content_filter": f"smtp:{nexthop}"}}
    r = relay_factory(extra, services=services)
    end = transaction(r.port(), msg="Subject: filter me\r\n\r\nbody\r\n")
    assert end.startswith("250 2.0.0 Ok: queued as ")
    qid = end.split()[-1]
    assert r.wait_log(f"{qid}: to=<alice@example.test>, relay=none, delay=", timeout=15)
    assert r.wait_log(f"dsn=4.3.5, status=deferred (bad port number in next hop {nexthop})", timeout=15)
    assert f"warning: bad port number in next hop {nexthop}" in r.log()
    assert "status=bounced" not in r.log() and "sender non-delivery notification" not in r.log()
    assert (r.dir / "queue" / "new" / qid).exists()
    assert r.maildir_files("example.test/alice/") == []


# ---- many recipients, late answers, one slow milter among many sessions ----

def test_added_recipients_beyond_the_limit_fail_the_milter(relay_factory, raw_milter):
    # before: additions after the 10000th were dropped without a word and the message was accepted
    adds = b"".join(pkt(b"+", f"<r{i}@localhost>\0".encode()) for i in range(10001))
    m = raw_milter({b"E": lambda _: adds + pkt(b"c")})
    r = relay_factory(f"smtpd_milters = {m.spec}\n")
    assert transaction(r.port()) == TEMPFAIL
    assert r.wait_log(f"warning: milter {m.spec}: bad or not negotiated modification '+'")
    nothing_stored(r)


def test_answer_after_the_timeout_is_not_taken_for_the_next_one(relay_factory, raw_milter):
    def late(_):
        time.sleep(1.5)
        yield pkt(b"y", b"550 5.7.1 too late\0")
    m = raw_milter({b"M": late})
    r = relay_factory(f"smtpd_milters = {{ {m.spec}, command_timeout=1s }}\n")
    c = SmtpConn(r.port())
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@example.org>") == TEMPFAIL
    time.sleep(1)   # the late reply has arrived by now; it must answer nothing
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    assert c.cmd("MAIL FROM:<a@example.org>") == TEMPFAIL   # the milter stays failed for the session
    c.quit()
    assert r.wait_log(f"warning: milter {m.spec}: read timeout")
    assert "too late" not in r.log()


def test_one_slow_milter_holds_only_its_own_sessions(relay_factory, raw_milter):
    def slow(_):
        time.sleep(2)
        yield pkt(b"c")
    m = raw_milter({b"E": slow})
    r = relay_factory("", services={"smtp": {"smtpd_milters": m.spec}, "plain": {}})
    results = []
    threads = [threading.Thread(target=lambda: results.append(transaction(r.port()))) for _ in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    wait_until(lambda: m.seen.count(b"E") == 8, 10, "eight messages at the slow milter")
    # meanwhile sessions of the same worker process without the milter are answered at once
    for _ in range(3):
        t1 = time.monotonic()
        assert transaction(r.port("plain"), rcpts=("bob@example.test",)).startswith("250 2.0.0 Ok: queued as ")
        assert time.monotonic() - t1 < 1.5
    for t in threads:
        t.join(30)
    assert len(results) == 8 and all(x.startswith("250 2.0.0 Ok: queued as ") for x in results), results
    assert time.monotonic() - t0 >= 2
    assert len(r.maildir_files("example.test/alice/")) == 8
    assert len(r.maildir_files("example.test/bob/")) == 3
