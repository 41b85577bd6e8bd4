"""header_checks, mime_header_checks, nested_header_checks and body_checks with pcre: and regexp:
tables: every action on a header and on a body line, folded headers, MIME parts and attached messages,
the exact replies, Postfix's log lines, and the stored bytes (or the absence of any file), over DATA and
BDAT."""
import re

import pytest

from conftest import SmtpConn, wait_until
from test_relay import Sink

HEADER_CHECKS = r"""
/^Subject: .*viagra/                 REJECT spam subject
/^Subject: plain reject/             REJECT
/^Subject: try later/                REJECT 4.7.0 come back later
/^Subject: discard me/               DISCARD not wanted
/^Subject: warn me/                  WARN suspicious subject
/^X-Drop-Me:/                        IGNORE
/^Subject: prepend me/               PREPEND X-Tagged: yes
/^Subject: replace (.*)$/            REPLACE Subject: [replaced] $1
/^Subject: folded\n\s+second line/   REJECT folded header matched
/^Subject: hold me/                  HOLD held for review
/^Subject: redirect me/              REDIRECT bob@example.test
/^Subject: filter me/                FILTER smtp:[127.0.0.1]:{sinkport}
/^Subject: nested subject/           REJECT primary rule must not see nested headers
/^Subject: bad prepend/              PREPEND not a header
/^Subject: dunno/                    DUNNO
"""

MIME_CHECKS = r"""
/^Content-Type: application\/x-msdownload/   REJECT executable attachment
/^Content-Disposition: .*filename="?[^"]*\.scr/s REJECT screensaver attachment
/^X-Part-Header: bad/                        REJECT part header via mime_header_checks
"""

NESTED_CHECKS = r"""
/^Subject: nested subject/           REJECT nested message rejected
"""

BODY_CHECKS = r"""
/^reject this body line$/            REJECT body says no
/^replace this line (\d+)$/          REPLACE replaced line $1
/^drop this line$/                   IGNORE
/^prepend before this$/              PREPEND inserted line
/^warn on this$/                     WARN body warning
/^discard on body$/                  DISCARD
/^late line$/                        REJECT too late to be seen
"""


@pytest.fixture
def checked(relay_factory, tmp_path):
    sink = Sink(tmp_path).start()
    (tmp_path / "hc").write_text(HEADER_CHECKS.replace("{sinkport}", str(sink.port)))
    (tmp_path / "mc").write_text(MIME_CHECKS)
    (tmp_path / "nc").write_text(NESTED_CHECKS)
    (tmp_path / "bc").write_text(BODY_CHECKS)
    r = relay_factory(f"""\
header_checks = pcre:{tmp_path}/hc
mime_header_checks = pcre:{tmp_path}/mc
nested_header_checks = regexp:{tmp_path}/nc
body_checks = pcre:{tmp_path}/bc
body_checks_size_limit = 4096
queue_run_delay = 1s
""")
    r.sink = sink
    yield r
    sink.remove()


def send(relay, body, rcpt="alice@example.test", bdat=False, sender="sender@example.org", wait=True):
    """One message; the final reply. With a HOLD, REDIRECT or FILTER rule in the tables every message
    goes through the queue: an accepted one (not discarded or held) is waited for until its queue file
    is removed, i.e. delivered."""
    c = SmtpConn(relay.port())
    c.ehlo("client.example.net")
    c.cmd(f"MAIL FROM:<{sender}>", 250)
    c.cmd(f"RCPT TO:<{rcpt}>", 250)
    if bdat:
        data = body.encode()
        half = len(data) // 2
        c.send(b"BDAT %d\r\n" % half + data[:half])
        c.expect(250)
        c.send(b"BDAT %d LAST\r\n" % (len(data) - half) + data[half:])
        final = c.reply()
    else:
        c.cmd("DATA", 354)
        c.send(body.encode() + b".\r\n")
        final = c.reply()
    c.cmd("QUIT", 221)
    qid = queue_id_of(final)
    if wait and qid:
        log = relay.log()
        if f"{qid}: discard:" not in log and f"{qid}: hold:" not in log:
            assert relay.wait_log(f"{qid}: removed", timeout=20), log[-3000:]
    return final


def box_files(relay, user="alice"):
    return relay.maildir_files(f"example.test/{user}/")


def queue_id_of(reply):
    m = re.search(r"queued as ([0-9A-F]+)", reply)
    return m.group(1) if m else None


def msg(subject, extra_headers="", body="hello\r\n"):
    return f"From: <sender@example.org>\r\nSubject: {subject}\r\n{extra_headers}\r\n{body}"


TAIL = "from unknown[127.0.0.1]; from=<sender@example.org> to=<alice@example.test> proto=ESMTP helo=<client.example.net>"


@pytest.mark.parametrize("bdat", [False, True], ids=["DATA", "BDAT"])
def test_header_reject_with_text(checked, bdat):
    assert send(checked, msg("buy viagra now"), bdat=bdat) == "550 5.7.1 spam subject"
    assert box_files(checked) == []
    log = checked.log()
    assert re.search(r"ktrelay/cleanup\[\d+\]: [0-9A-F]+: reject: header Subject: buy viagra now " +
                     re.escape(TAIL) + ": 5.7.1 spam subject$", log, re.M), log
    # the session goes on
    assert queue_id_of(send(checked, msg("fine"), bdat=bdat))
    assert len(box_files(checked)) == 1


def test_header_reject_default_and_temporary(checked):
    assert send(checked, msg("plain reject")) == "550 5.7.1 message content rejected"
    assert send(checked, msg("try later")) == "451 4.7.0 come back later"
    assert box_files(checked) == []
    assert "reject: header Subject: try later " + TAIL + ": 4.7.0 come back later" in checked.log()


def test_header_discard(checked):
    r = send(checked, msg("discard me"))
    qid = queue_id_of(r)
    assert r == f"250 2.0.0 Ok: queued as {qid}"
    assert f"{qid}: discard: header Subject: discard me {TAIL}: not wanted" in checked.log()
    assert box_files(checked) == []
    assert not list((checked.dir / "queue" / "new").iterdir())


def test_header_warn_ignore_prepend_replace_dunno(checked):
    r = send(checked, msg("warn me", "X-Drop-Me: gone\r\n X-folded-part: gone too\r\nX-Keep: kept\r\n"))
    qid = queue_id_of(r)
    assert f"{qid}: warning: header Subject: warn me {TAIL}: suspicious subject" in checked.log()
    send(checked, msg("prepend me"))
    send(checked, msg("replace this please"))
    send(checked, msg("dunno"))
    send(checked, msg("bad prepend"))
    files = [f.read_bytes() for f in sorted(box_files(checked), key=lambda p: p.stat().st_mtime_ns)]
    assert len(files) == 5
    head = [f.split(b"\r\n\r\n", 1)[0] + b"\r\n" for f in files]
    # WARN keeps everything; IGNORE removed the header with its folded line
    assert b"Subject: warn me\r\nX-Keep: kept" in head[0] and b"X-Drop-Me" not in head[0]
    assert b"folded-part" not in head[0]
    assert b"X-Tagged: yes\r\nSubject: prepend me\r\n" in head[1]
    assert b"Subject: [replaced] this please\r\n" in head[2] and b"Subject: replace this" not in head[2]
    assert b"Subject: dunno\r\n" in head[3]
    assert b"Subject: bad prepend\r\n" in head[4] and b"not a header" not in head[4]
    log = checked.log()
    assert f"prepend: header Subject: prepend me {TAIL}: X-Tagged: yes" in log
    assert f"replace: header Subject: replace this please {TAIL}: Subject: [replaced] this please" in log
    assert 'warning: bad PREPEND header text "not a header" in header_checks map -- need "headername: headervalue"' \
        in log
    # the bodies are untouched
    assert all(f.endswith(b"\r\n\r\nhello\r\n") for f in files)


def test_folded_header_is_one_logical_header(checked):
    body = "From: <sender@example.org>\r\nSubject: folded\r\n\tsecond line\r\n\r\nhi\r\n"
    assert send(checked, body) == "550 5.7.1 folded header matched"
    # the log shows the header without its line break
    assert f"reject: header Subject: folded\tsecond line {TAIL}: 5.7.1 folded header matched" in checked.log()
    # not folded: no match
    assert queue_id_of(send(checked, "Subject: folded\r\nX: second line\r\n\r\nhi\r\n"))


@pytest.mark.parametrize("bdat", [False, True], ids=["DATA", "BDAT"])
def test_body_actions(checked, bdat):
    assert send(checked, msg("b1", body="first\r\nreject this body line\r\nlast\r\n"), bdat=bdat) == \
        "550 5.7.1 body says no"
    assert f"reject: body reject this body line {TAIL}: 5.7.1 body says no" in checked.log()
    assert box_files(checked) == []
    body = "keep\r\nreplace this line 42\r\ndrop this line\r\nprepend before this\r\nwarn on this\r\nend\r\n"
    r = send(checked, msg("b2", body=body), bdat=bdat)
    qid = queue_id_of(r)
    (f,) = box_files(checked)
    stored = f.read_bytes().split(b"\r\n\r\n", 1)[1]
    assert stored == b"keep\r\nreplaced line 42\r\ninserted line\r\nprepend before this\r\nwarn on this\r\nend\r\n"
    log = checked.log()
    assert f"{qid}: warning: body warn on this {TAIL}: body warning" in log
    assert f"{qid}: replace: body replace this line 42 {TAIL}: replaced line 42" in log


def test_body_discard_and_size_limit(checked):
    r = send(checked, msg("b3", body="a\r\ndiscard on body\r\n"))
    assert f"{queue_id_of(r)}: discard: body discard on body {TAIL}" in checked.log()
    assert box_files(checked) == []
    # body_checks_size_limit = 4096: a line that starts past it is not looked at
    filler = ("x" * 70 + "\r\n") * 60
    assert queue_id_of(send(checked, msg("b4", body=filler + "late line\r\n")))
    assert send(checked, msg("b5", body="late line\r\n" + filler)) == "550 5.7.1 too late to be seen"
    (f,) = box_files(checked)
    assert f.read_bytes().endswith(filler.encode() + b"late line\r\n")


MIME_MSG = """\
From: <sender@example.org>\r
Subject: with parts\r
MIME-Version: 1.0\r
Content-Type: multipart/mixed; boundary="=_outer"\r
\r
preamble\r
--=_outer\r
Content-Type: text/plain\r
{part_header}\r
reject this body line? no: body lines of parts are checked too, this one differs\r
--=_outer\r
Content-Type: {attachment}\r
\r
QUJD\r
--=_outer--\r
epilogue\r
"""


def test_mime_header_checks_apply_to_parts(checked):
    ok = MIME_MSG.format(part_header="X-Part-Header: good\r\n", attachment="application/pdf")
    assert queue_id_of(send(checked, ok))
    assert send(checked, MIME_MSG.format(part_header="", attachment="application/x-msdownload")) == \
        "550 5.7.1 executable attachment"
    assert send(checked, MIME_MSG.format(part_header="X-Part-Header: bad\r\n", attachment="text/plain")) == \
        "550 5.7.1 part header via mime_header_checks"
    disp = 'application/octet-stream\r\nContent-Disposition: attachment;\r\n filename="x.scr"'
    assert send(checked, MIME_MSG.format(part_header="", attachment=disp)) == \
        "550 5.7.1 screensaver attachment"
    # a part header is not a primary header: header_checks do not see it
    assert queue_id_of(send(checked, MIME_MSG.format(part_header="X-Drop-Me: stays in the part\r\n",
                                                     attachment="text/plain")))
    files = [f.read_bytes() for f in box_files(checked)]
    assert len(files) == 2
    assert any(b"X-Drop-Me: stays in the part\r\n" in f for f in files)
    # the same header in the primary section is a MIME header: mime_header_checks apply there too
    assert send(checked, msg("x", "Content-Type: application/x-msdownload\r\n")) == \
        "550 5.7.1 executable attachment"


def test_nested_header_checks_apply_to_attached_messages(checked):
    attached = """\
From: <sender@example.org>\r
Subject: forwarding\r
MIME-Version: 1.0\r
Content-Type: multipart/mixed; boundary=b1\r
\r
--b1\r
Content-Type: message/rfc822\r
\r
From: <other@example.org>\r
Subject: nested subject\r
\r
inner body\r
--b1--\r
"""
    assert send(checked, attached) == "550 5.7.1 nested message rejected"
    log = checked.log()
    assert "reject: header Subject: nested subject " + TAIL + ": 5.7.1 nested message rejected" in log
    # the primary rule for the same text applies only to the message's own header
    assert send(checked, msg("nested subject")) == "550 5.7.1 primary rule must not see nested headers"


def test_hold_keeps_the_message_in_the_hold_queue(checked):
    r = send(checked, msg("hold me"))
    qid = queue_id_of(r)
    assert r == f"250 2.0.0 Ok: queued as {qid}"
    held = checked.dir / "queue" / "hold" / qid
    assert held.exists()
    assert f"{qid}: hold: header Subject: hold me {TAIL}: held for review" in checked.log()
    # listed as held, never delivered
    assert box_files(checked) == []
    assert not (checked.dir / "queue" / "new" / qid).exists()
    data = held.read_bytes()
    assert b"rcpt alice@example.test\n" in data and b"\nSubject: hold me\r\n" in data


def test_redirect_delivers_to_the_new_address_only(checked):
    r = send(checked, msg("redirect me"), wait=False)
    qid = queue_id_of(r)
    assert r == f"250 2.0.0 Ok: queued as {qid}"
    assert f"{qid}: redirect: header Subject: redirect me {TAIL}: bob@example.test" in checked.log()
    wait_until(lambda: box_files(checked, "bob"), what="delivery to bob")
    assert box_files(checked, "alice") == []
    (f,) = box_files(checked, "bob")
    assert b"Subject: redirect me\r\n" in f.read_bytes()
    assert checked.wait_log(f"{qid}: to=<bob@example.test>")
    assert not (checked.dir / "queue" / "hold" / qid).exists()


def test_filter_sends_every_recipient_to_the_filter(checked):
    r = send(checked, msg("filter me"), wait=False)
    qid = queue_id_of(r)
    assert f"{qid}: filter: header Subject: filter me {TAIL}: smtp:[127.0.0.1]:{checked.sink.port}" in checked.log()
    wait_until(lambda: any(b"Subject: filter me" in m for m in checked.sink.messages()),
               what="the filter's copy", timeout=20)
    assert checked.wait_log(f"{qid}: to=<alice@example.test>, relay=127.0.0.1[127.0.0.1]:{checked.sink.port}")
    assert box_files(checked) == []


def test_header_size_limit_cuts_a_long_header(relay_factory, tmp_path):
    """header_size_limit bounds what is held of one logical header: the rest is dropped, the header still
    ends its line, and the next header and the body are untouched."""
    (tmp_path / "hc").write_text("/^X-Long: (a+)$/ WARN long header\n")
    r = relay_factory(f"header_checks = regexp:{tmp_path}/hc\nheader_size_limit = 120\n")
    long_value = "a" * 300
    body = f"X-Long: {long_value}\r\n\tfolded-tail\r\nSubject: after\r\n\r\nbody line\r\n"
    reply = send(r, body)
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    (f,) = box_files(r)
    data = f.read_bytes()
    cut = data[data.index(b"X-Long: "):]
    assert cut.startswith(b"X-Long: " + b"a" * 112 + b"\r\nSubject: after\r\n\r\nbody line\r\n")
    # the lookup saw the cut header (120 bytes: "X-Long: " and 112 a's), which still matches
    assert f"warning: header X-Long: {'a' * 112} {TAIL}: long header" in r.log()


def test_hostile_pattern_on_many_headers_is_bounded_per_message(relay_factory, tmp_path):
    # a catastrophic-backtracking rule: every lookup of an "X-Hostile: aaa...a!" header runs to the match
    # limit (~15 ms); 300 such headers would hold the worker thread for seconds. The lookups of one message
    # share a 1 s budget: past it the message is deferred and nothing of it is stored.
    (tmp_path / "hostile").write_text("/^X-Hostile: (a|aa|aaa)+$/ REJECT never matches\n")
    r = relay_factory(f"header_checks = pcre:{tmp_path}/hostile\n")
    hdrs = "".join(f"X-Hostile: {'a' * 40}!\r\n" for _ in range(300))
    c = SmtpConn(r.port())
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>", 250)
    c.cmd("RCPT TO:<alice@example.test>", 250)
    c.cmd("DATA", 354)
    c.send("From: a@example.org\r\nSubject: hi\r\n" + hdrs + "\r\nbody\r\n.\r\n")
    assert c.reply() == "451 4.3.0 Error: too much time in header and body checks"
    # the session goes on, and an ordinary message passes the same table
    c.cmd("MAIL FROM:<a@example.org>", 250)
    c.cmd("RCPT TO:<alice@example.test>", 250)
    c.cmd("DATA", 354)
    c.send("From: a@example.org\r\nX-Hostile: aaaa\r\n\r\nbody\r\n.\r\n")
    assert c.reply() == "550 5.7.1 never matches"
    c.quit()
    assert r.wait_log("warning: ")
    assert re.search(r"warning: \w+: header and body checks took more than 1000 ms for this message from "
                     r"unknown\[127\.0\.0\.1\]; from=<a@example\.org> to=<alice@example\.test> proto=ESMTP "
                     r"helo=<client\.example\.net>; message deferred", r.log())
    assert r.maildir_files("example.test/alice/") == [] and r.maildir_files("example.test/alice/", "tmp") == []
