"""Attacks on the non-SMTP milter path: maildrop/ and its pickup with non_smtpd_milters, by a hostile local
user (drop files written by hand, envelopes `ktrelay sendmail` is asked to drop) and a broken milter (one
that never answers, while ktrelay is stopped or killed). The milter is test_break_milter's RawMilter, a raw
implementation of the wire protocol; each test checks the exact log lines, exit statuses and files."""
import os
import signal
import subprocess
import threading

import pytest

from conftest import BASE_MAIN_CF, BASE_VMAILBOX, BIN, Relay, SmtpConn, child_pids, make_searchable, wait_until
from test_break_milter import pkt, raw_milter  # noqa: F401 (a fixture)

CANT_REJECT = "milter configuration error: can't reject recipient in non-smtpd(8) submission"


def maildrop(relay):
    return relay.dir / "queue" / "maildrop"


def drop(relay, name, sender, rcpts, body=b"Subject: by hand\n\nhi\n"):
    """A drop file as a local user may write it into maildrop/ (mode 1733): under a dot name, then renamed."""
    env = f"KTQUEUE 1\nsender {sender}\n" + "".join(f"rcpt {r}\n" for r in rcpts) + "body\n"
    tmp = maildrop(relay) / f".{name}"
    tmp.write_bytes(env.encode() + body)
    os.rename(tmp, maildrop(relay) / name)


def replace_maildrop(relay):
    """What an operator does to set maildrop/ aside: it is renamed maildrop.old (returned), and a new one with
    the same owner and mode takes its place."""
    old = maildrop(relay).with_name("maildrop.old")
    st = maildrop(relay).stat()
    os.rename(maildrop(relay), old)
    maildrop(relay).mkdir()
    os.chown(maildrop(relay), st.st_uid, st.st_gid)
    os.chmod(maildrop(relay), st.st_mode & 0o7777)
    return old


def descendants(pid):
    return [x for k in child_pids(pid) for x in [k, *descendants(k)]]


def files_in(relay, *subdirs):
    """Every file (dot files included) in the queue's subdirs."""
    out = []
    for sub in subdirs:
        d = relay.dir / "queue" / sub
        out += sorted(f"{sub}/{x.name}" for x in d.iterdir()) if d.exists() else []
    return out


def test_files_the_milters_keep_deferring_hide_no_other_file(relay_factory, raw_milter):
    """A user's 1,100 drop files that the milter refuses at RCPT (kept in maildrop/, as Postfix's cleanup
    keeps them) are each tried once, and do not stop the pickup from reaching the files after them: it used
    to look at the first thousand directory entries only, so once a thousand kept files came first, no
    other local mail was picked up until their retry time, and then the same thousand again."""
    m = raw_milter({b"R": lambda d: pkt(b"r") if d.startswith(b"spam@") else pkt(b"c")})
    r = relay_factory(f"non_smtpd_milters = {m.spec}\nqueue_run_delay = 1h\n")
    wait_until(maildrop(r).is_dir, 10, "maildrop/")
    for i in range(1100):
        drop(r, f"S{i:05d}", "mallory@example.test", ["spam@example.test"])
    assert r.wait_log(CANT_REJECT, 60, count=1100), r.log().count(CANT_REJECT)
    drop(r, "GOOD", "alice@example.test", ["bob@example.test"])
    wait_until(lambda: r.maildir_files("example.test/bob/"), 20, "delivery of the file after them")
    assert r.maildir_files("example.test/bob/")[0].read_bytes().endswith(b"\r\nSubject: by hand\r\n\r\nhi\r\n")
    # each kept file was tried exactly once (none again before queue_run_delay), and all are still there
    assert r.log().count(CANT_REJECT) == 1100
    assert r.log().count("milter-reject: RCPT from localhost[127.0.0.1]: 550 5.7.1 Command rejected; "
                         "from=<mallory@example.test> to=<spam@example.test>") == 1100
    assert files_in(r, "maildrop") == [f"maildrop/S{i:05d}" for i in range(1100)]


@pytest.mark.parametrize("milters,args,said", [
    # through maildrop/: the pickup would remove the file as malformed, after sendmail had exited 0
    (True, ["-f", "alice@example.test", "<bob smith@example.test>", "bob@example.test"],
     "recipient address <bob smith@example.test> cannot be used"),
    (True, ["-f", "alice@example.test", "a" * 600 + "@example.test"],
     "recipient address <" + "a" * 79 + "...> cannot be used"),
    (True, ["-f", "alice@example.test", *[f"u{i}@example.test" for i in range(10001)]],
     "10001 recipients, more than 10000 in one message"),
    # root's direct queueing: the address would have added a content filter line to the queue file
    (False, ["-f", "alice@example.test\nfilter smtp:[127.0.0.1]:9", "bob@example.test"],
     "sender address <alice@example.test?filter smtp:[127.0.0.1]:9> cannot be used"),
], ids=["space", "long", "10001-rcpts", "lf-direct"])
def test_sendmail_refuses_an_envelope_nothing_could_queue(relay_factory, raw_milter, milters, args, said):
    extra = f"non_smtpd_milters = {raw_milter().spec}\n" if milters else ""
    r = relay_factory(extra)
    wait_until(maildrop(r).is_dir, 10, "maildrop/")
    p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), *args], input=b"Subject: x\n\nhi\n", capture_output=True,
                       timeout=60)
    assert p.returncode == 65, p.stderr
    assert p.stdout == b""
    tail = ": it has a space, a control character, < or >, or more than 512 bytes" if "address" in said else ""
    assert p.stderr.decode() == f"sendmail: {said}{tail}; message not queued\n"
    assert files_in(r, "maildrop", "new", "tmp", "hold") == []


def test_a_multiline_reject_is_one_diagnostic_code_line(relay_factory, raw_milter):
    """A milter's multi-line 5xx (SMFIR_REPLYCODE) at the end of a local message: the returned message's
    Diagnostic-Code field quotes it on one line (it used to break the delivery-status part with a line of
    its own for each reply line)."""
    m = raw_milter({b"E": pkt(b"y", b"550-5.7.1 first line\r\n550 5.7.1 second line\0")})
    r = relay_factory(f"non_smtpd_milters = {m.spec}\n")
    p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), "-f", "alice@example.test", "bob@example.test"],
                       input=b"Subject: refused\n\nhi\n", capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    wait_until(lambda: r.maildir_files("example.test/alice/"), 15, "the bounce to alice")
    dsn = r.maildir_files("example.test/alice/")[0].read_bytes()
    assert (b"Action: failed\r\nStatus: 5.7.1\r\n"
            b"Diagnostic-Code: X-Ktrelay; 550-5.7.1 first line 550 5.7.1 second line\r\n") in dsn, dsn
    assert b"\r\n550 5.7.1 second line" not in dsn
    assert r.wait_log("milter-reject: END-OF-MESSAGE from localhost[127.0.0.1]: 550-5.7.1 first line??550 5.7.1 "
                      "second line; from=<alice@example.test> to=<bob@example.test>")
    assert files_in(r, "maildrop") == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill-9"])
def test_stop_during_a_conversation_keeps_the_drop_file_for_one_delivery(tmp_path, raw_milter, sig):
    """ktrelay stopped (SIGTERM: after its grace period) or killed while a milter sits on the end of a
    local message: the drop file is still there, nothing is queued or delivered, and the next start
    delivers the message exactly once. SIGTERM also frees the abandoned conversation (an ASan build
    reports any leak at exit, and the instance must exit 0)."""
    hung = raw_milter({b"E": lambda d: []})   # never answers the end of message
    d = tmp_path / "relay"
    d.mkdir()
    make_searchable(d)
    (d / "vmailbox").write_text(BASE_VMAILBOX)
    base = BASE_MAIN_CF.format(dir=d) + "queue_run_delay = 1s\n"
    r = Relay(d, base + f"non_smtpd_milters = {hung.spec}\n", {"smtp": {}})
    try:
        wait_until(maildrop(r).is_dir, 10, "maildrop/")
        p = subprocess.run([BIN, "sendmail", "-c", str(d), "-f", "alice@example.test", "bob@example.test"],
                           input=b"Subject: once\n\nexactly once\n", capture_output=True, timeout=30)
        assert p.returncode == 0, p.stderr
        wait_until(lambda: b"E" in hung.seen, 15, "the end of message at the milter")
        dropped = files_in(r, "maildrop")
        assert len(dropped) == 1 and not dropped[0].startswith("maildrop/.")
        if sig == signal.SIGKILL:
            for pid in [r.proc.pid, *descendants(r.proc.pid)]:
                os.kill(pid, signal.SIGKILL)
    finally:
        rc = r.stop()
    log = (d / "ktrelay.log").read_text(errors="replace")
    if sig == signal.SIGTERM:
        assert rc == 0, log[-4000:]
        assert "runtime error" not in log and "AddressSanitizer" not in log, log[-4000:]
    assert files_in(r, "maildrop", "new", "hold") == dropped
    assert r.maildir_files("example.test/bob/") == []
    ok = raw_milter()
    r2 = Relay(d, base + f"non_smtpd_milters = {ok.spec}\n", {"smtp": {}})
    try:
        wait_until(lambda: files_in(r2, "maildrop") == [], 15, "the drop file to be picked up")
        wait_until(lambda: r2.maildir_files("example.test/bob/"), 15, "delivery to bob")
        assert r2.wait_log(" status=sent ", 15)
        # one pickup line per message, as Postfix's pickup logs it (it used to be logged again once queued)
        assert r2.log().count("ktrelay/pickup[") == 1, r2.log()
        assert len(r2.maildir_files("example.test/bob/")) == 1
        assert r2.maildir_files("example.test/bob/")[0].read_bytes().endswith(b"\r\n\r\nexactly once\r\n")
        assert ok.seen.count(b"E") == 1
    finally:
        rc = r2.stop()
    log = (d / "ktrelay.log").read_text(errors="replace")
    assert rc == 0, log[-4000:]
    assert "runtime error" not in log and "AddressSanitizer" not in log, log[-4000:]


@pytest.mark.parametrize("milters", [True, False], ids=["maildrop", "direct"])
def test_sendmail_refuses_a_message_over_message_size_limit(relay_factory, raw_milter, milters):
    """A local message larger than message_size_limit is refused by sendmail, as Postfix's sendmail refuses
    it (exit 69, "SENDER(UID): message file too big"): it used to be dropped with exit 0, and the pickup
    then removed it with a log line only, so neither the user nor the sender heard of it. One just under the
    limit is still delivered."""
    extra = f"non_smtpd_milters = {raw_milter().spec}\n" if milters else ""
    r = relay_factory(extra + "message_size_limit = 4000\n")
    wait_until(maildrop(r).is_dir, 10, "maildrop/")
    big = b"Subject: big\n\n" + b"x" * 70 + b"\n"
    p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), "-f", "alice@example.test", "bob@example.test"],
                       input=big * 60, capture_output=True, timeout=30)
    assert p.returncode == 69, p.stderr
    assert p.stderr == b"sendmail: fatal: alice@example.test(0): message file too big\n"
    assert files_in(r, "maildrop", "new", "tmp", "hold") == []
    p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), "-f", "alice@example.test", "bob@example.test"],
                       input=big * 30, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    wait_until(lambda: r.maildir_files("example.test/bob/"), 20, "delivery of the smaller message")
    assert "exceeds message_size_limit" not in r.log()


def test_sendmail_bs_answers_552_for_a_message_over_message_size_limit(relay_factory):
    """In -bs mode the message over the limit is read to its end and refused 552 5.3.4 (smtpd's reply);
    the session goes on, and the next transaction is queued."""
    r = relay_factory("message_size_limit = 4000\n")
    line = b"x" * 70 + b"\r\n"
    tx = b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: %s\r\n\r\n%s.\r\n"
    dialogue = b"EHLO client\r\n" + tx % (b"big", line * 100) + tx % (b"small", line) + b"QUIT\r\n"
    p = subprocess.run([BIN, "sendmail", "-bs", "-c", str(r.dir)], input=dialogue, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    finals = [ln for ln in p.stdout.split(b"\r\n") if ln[3:4] == b" "]
    assert finals[5:] == [b"552 5.3.4 Error: message file too big", b"250 2.1.0 Ok", b"250 2.1.5 Ok",
                          b"354 End data with <CR><LF>.<CR><LF>", b"250 2.0.0 Ok: queued", b"221 2.0.0 Bye"], p.stdout
    wait_until(lambda: r.maildir_files("example.test/bob/"), 20, "delivery of the small message")
    assert len(r.maildir_files("example.test/bob/")) == 1
    assert b"Subject: small\r\n" in r.maildir_files("example.test/bob/")[0].read_bytes()


@pytest.mark.parametrize("milters", [True, False], ids=["maildrop", "direct"])
def test_the_largest_envelope_sendmail_takes_is_queued_and_loaded(relay_factory, raw_milter, milters):
    """10,000 recipients of 500 bytes each, the most sendmail and the pickup accept, make an envelope of
    about 5 MB. Through maildrop/ the pickup removed such a file as larger than message_size_limit (it
    allowed 1 MB for the envelope); queued directly, the queue manager could not load an envelope over 4 MB
    and the message stayed in new/ for good. Now it is queued either way, and the queue listing (which
    loads each file as the queue manager does) shows every recipient while delivery is deferred."""
    extra = f"non_smtpd_milters = {raw_milter().spec}\n" if milters else ""
    r = relay_factory(extra + "relayhost = [127.0.0.1]:9\n")
    wait_until(maildrop(r).is_dir, 10, "maildrop/")
    rcpts = [f"{i:05d}" + "r" * 483 + "@example.org" for i in range(10000)]
    to = "To: " + ",\n ".join(rcpts) + "\n"       # -t: too many for a command line
    p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), "-t", "-f", "alice@example.test"],
                       input=to.encode() + b"Subject: many\n\nhi\n", capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    if milters:   # (sendmail logs a direct submission's lines itself)
        assert r.wait_log("nrcpt=10000 (queue active)", 60), r.log()[-3000:]
    # the queue manager loaded it
    assert r.wait_log("status=deferred (connect to 127.0.0.1[127.0.0.1]:9: Connection refused)", 60, count=10000)
    p = subprocess.run([BIN, "queue", "list", "-c", str(r.dir)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert sum(1 for ln in p.stdout.splitlines() if ln.strip() in rcpts) == 10000, p.stdout[:2000]
    assert "exceeds message_size_limit" not in r.log()


KEPT = "recipient spam@example.test cannot be rewritten; kept for a later try"


def kept_drop_files(relay_factory, count):
    """A relay without milters and COUNT drop files (S00000, ...) that stay in maildrop/: their recipient's
    canonical_maps result is too long, so the pickup cannot rewrite it and keeps the file (logging KEPT).
    Returns the relay and the file names."""
    long = "x" * 600 + "@example.test"
    r = relay_factory(f"canonical_maps = inline:{{ spam@example.test={long} }}\n")
    wait_until(maildrop(r).is_dir, 10, "maildrop/")
    names = [f"S{i:05d}" for i in range(count)]
    for name in names:
        drop(r, name, "mallory@example.test", ["spam@example.test"])
    return r, names


def test_files_kept_without_milters_hide_no_other_file(relay_factory):
    """Without milters too, a pass goes through the whole of maildrop/: a user's 1,100 drop files that stay
    there (a recipient whose canonical_maps result is too long cannot be rewritten, and the file is kept
    for a later try) are each tried, and a file after them is picked up. The pickup used to look at the
    first 1,000 directory entries on every tick, the same ones each time while they stayed."""
    r, names = kept_drop_files(relay_factory, 1100)

    def all_tried():
        log = r.log()
        return all(f"maildrop/{n}: {KEPT}" in log for n in names)
    wait_until(all_tried, 60, "every kept file to be tried")
    drop(r, "GOOD", "alice@example.test", ["bob@example.test"])
    wait_until(lambda: r.maildir_files("example.test/bob/"), 20, "delivery of the file after them")
    assert files_in(r, "maildrop") == [f"maildrop/{n}" for n in names]


def test_sendmail_t_with_its_recipients_past_the_limit_is_too_big(relay_factory):
    """-t with the To: header beyond message_size_limit: reading stops at the limit, and the refusal is
    the size (exit 69), not "no recipients" (exit 64)."""
    r = relay_factory("message_size_limit = 1000\n")
    msg = b"X-Pad: " + b"p" * 1500 + b"\nTo: bob@example.test\nSubject: x\n\nhi\n"
    p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), "-t", "-f", "alice@example.test"], input=msg,
                       capture_output=True, timeout=30)
    assert p.returncode == 69, p.stderr
    assert p.stderr == b"sendmail: fatal: alice@example.test(0): message file too big\n"


def test_the_largest_message_size_limit_loses_nothing(relay_factory, raw_milter):
    """message_size_limit = 2^63-1 (check-config takes it): the pickup's bound for a drop file overflowed, and
    it removed every local message sendmail had accepted."""
    r = relay_factory(f"non_smtpd_milters = {raw_milter().spec}\nmessage_size_limit = 9223372036854775807\n")
    wait_until(maildrop(r).is_dir, 10, "maildrop/")
    p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), "-f", "alice@example.test", "bob@example.test"],
                       input=b"Subject: x\n\nhi\n", capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    wait_until(lambda: r.maildir_files("example.test/bob/"), 20, "delivery")
    assert "exceeds message_size_limit" not in r.log()


def test_a_pass_ends_when_maildrop_is_replaced(relay_factory):
    """An operator moves maildrop/ aside (to quarantine it) and makes a new one: the pass under way, which
    keeps its directory open from tick to tick, ends at the next tick instead of reading the old directory
    to its end, as Postfix's pickup opens each file by its name under maildrop/."""
    r, names = kept_drop_files(relay_factory, 3000)
    wait_until(lambda: KEPT in r.log(), 20, "the pass to begin")
    old = replace_maildrop(r)
    drop(r, "GOOD", "alice@example.test", ["bob@example.test"])
    wait_until(lambda: r.maildir_files("example.test/bob/"), 30, "delivery from the new maildrop/")
    tried = sum(1 for n in names if f"maildrop/{n}: {KEPT}" in r.log())
    assert 0 < tried < len(names), tried


def test_a_pass_with_milters_ends_when_maildrop_is_replaced(relay_factory, raw_milter):
    """The same with non_smtpd_milters: the pass goes from one conversation to the next, and ends at the
    next one after maildrop/ is moved aside, instead of reading the old directory to its end."""
    m = raw_milter({b"R": lambda d: pkt(b"r") if d.startswith(b"spam@") else pkt(b"c")})
    r = relay_factory(f"non_smtpd_milters = {m.spec}\nqueue_run_delay = 1h\n")
    wait_until(maildrop(r).is_dir, 10, "maildrop/")
    names = [f"S{i:05d}" for i in range(3000)]
    for name in names:
        drop(r, name, "mallory@example.test", ["spam@example.test"])
    wait_until(lambda: CANT_REJECT in r.log(), 20, "the pass to begin")
    old = replace_maildrop(r)
    drop(r, "GOOD", "alice@example.test", ["bob@example.test"])
    wait_until(lambda: r.maildir_files("example.test/bob/"), 60, "delivery from the new maildrop/")
    tried = r.log().count(CANT_REJECT)
    assert 0 < tried < len(names), tried
    assert sorted(x.name for x in old.iterdir()) == names


def test_sendmail_refuses_a_huge_line_without_holding_it(relay_factory):
    """A 200 MB line against a 1 MB message_size_limit: sendmail refuses the message as too big once it has
    read past the limit, and never holds the whole line (it used to read each line whole before it looked
    at the size: its peak memory was over 200 MB)."""
    r = relay_factory("message_size_limit = 1000000\n")
    piece = b"y" * (1 << 20)   # written 200 times, so this process stays small (its child's peak counts it)
    p = subprocess.Popen([BIN, "sendmail", "-c", str(r.dir), "-f", "alice@example.test", "bob@example.test"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def feed():
        try:
            p.stdin.write(b"Subject: x\n\n")
            for _ in range(200):
                p.stdin.write(piece)
            p.stdin.write(b"\n")
            p.stdin.close()
        except BrokenPipeError:
            pass   # it stopped reading at the limit
    t = threading.Thread(target=feed)
    t.start()
    out, err = p.stdout.read(), p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)   # this child's own peak memory
    p.returncode = os.waitstatus_to_exitcode(status)
    t.join()
    assert p.returncode == 69, err
    assert (out, err) == (b"", b"sendmail: fatal: alice@example.test(0): message file too big\n")
    assert usage.ru_maxrss < 128 << 10, usage.ru_maxrss   # KB (the sanitizer build's own overhead included)
    assert files_in(r, "maildrop", "new", "tmp", "hold") == []


@pytest.mark.parametrize("n", [65534, 65535, 65536, 65537, 200000])
@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_long_lines_read_in_pieces_are_stored_whole(relay_factory, n, eol):
    """Lines around and past the 64 KB pieces sendmail reads them in (a CR of a CRLF may be the last byte of
    a piece) are stored as one line each, ended by one CRLF."""
    r = relay_factory()
    line = (b"a" * (n - 1) + b"b")
    msg = b"Subject: long" + eol + eol + line + eol + b"." + line[:10] + eol + b"end" + eol
    p = subprocess.run([BIN, "sendmail", "-c", str(r.dir), "-f", "alice@example.test", "bob@example.test"],
                       input=msg, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    wait_until(lambda: r.maildir_files("example.test/bob/"), 20, "delivery")
    data = r.maildir_files("example.test/bob/")[0].read_bytes()
    assert b"\r\nSubject: long\r\n" in data
    assert data.endswith(b"\r\n\r\n" + line + b"\r\n." + line[:10] + b"\r\nend\r\n"), data[-200:]


def test_sendmail_bs_bounds_its_lines_and_stores_canonical_lines(relay_factory):
    """-bs: a command line past 2,048 bytes is answered 500 5.5.2 as smtpd answers it; a bare CR in the body
    is stored as a line end, as smtpd stores it (it went into the queue file raw); a 50 MB body line past
    message_size_limit is read to the "." without being held, refused 552 5.3.4, and the session goes on."""
    r = relay_factory("message_size_limit = 1000000\n")
    tx = b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    piece = b"y" * (1 << 20)
    p = subprocess.Popen([BIN, "sendmail", "-bs", "-c", str(r.dir)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def feed():
        p.stdin.write(b"EHLO client\r\nNOOP " + b"x" * 5000 + b"\r\n")
        p.stdin.write(tx + b"Subject: big\r\n\r\n")
        for _ in range(50):
            p.stdin.write(piece)
        p.stdin.write(b"\r\n.\r\n" + tx + b"Subject: cr\r\n\r\nab\rcd\r\n..dot\r\n.\r\nQUIT\r\n")
        p.stdin.close()
    t = threading.Thread(target=feed)
    t.start()
    out, err = p.stdout.read(), p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    t.join()
    assert os.waitstatus_to_exitcode(status) == 0, err
    finals = [ln for ln in out.split(b"\r\n") if ln[3:4] == b" "]
    assert finals[2:] == [b"500 5.5.2 Error: line too long",
                          b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 End data with <CR><LF>.<CR><LF>",
                          b"552 5.3.4 Error: message file too big",
                          b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 End data with <CR><LF>.<CR><LF>",
                          b"250 2.0.0 Ok: queued", b"221 2.0.0 Bye"], out
    assert usage.ru_maxrss < 128 << 10, usage.ru_maxrss   # KB
    wait_until(lambda: r.maildir_files("example.test/bob/"), 20, "delivery")
    (f,) = r.maildir_files("example.test/bob/")
    data = f.read_bytes()
    assert b"\r\nSubject: cr\r\n" in data
    assert data.endswith(b"\r\n\r\nab\r\ncd\r\n.dot\r\n"), data[-100:]


def test_sendmail_bs_announces_size_and_refuses_a_larger_message_before_its_data(relay_factory):
    """-bs announces SIZE as smtpd does and answers MAIL FROM's SIZE= as smtpd answers it: larger than
    message_size_limit, 552 5.3.4 before any data is sent; not a number, 501 5.5.4."""
    r = relay_factory("message_size_limit = 4000\n")
    dialogue = (b"EHLO client\r\nMAIL FROM:<alice@example.test> SIZE=4001\r\n"
                b"MAIL FROM:<alice@example.test> SIZE=12x\r\nMAIL FROM:<alice@example.test> size=100\r\n"
                b"RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: small\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    p = subprocess.run([BIN, "sendmail", "-bs", "-c", str(r.dir)], input=dialogue, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split(b"\r\n")
    assert lines[1:6] == [b"250-mx.example.test", b"250-PIPELINING", b"250-SIZE 4000", b"250-8BITMIME",
                          b"250 ENHANCEDSTATUSCODES"], p.stdout
    assert lines[6:] == [b"552 5.3.4 Message size exceeds fixed limit", b"501 5.5.4 Bad SIZE parameter value",
                         b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 End data with <CR><LF>.<CR><LF>",
                         b"250 2.0.0 Ok: queued", b"221 2.0.0 Bye", b""], p.stdout
    wait_until(lambda: r.maildir_files("example.test/bob/"), 20, "delivery")


def test_a_file_in_conversation_when_maildrop_is_replaced_is_removed_from_its_own_directory(relay_factory,
                                                                                           raw_milter):
    """maildrop/ moved aside while a milter holds the end of a local message: once accepted and queued, the
    drop file is removed from the directory it was read from (it was unlinked by name under the new
    maildrop/, where it is not, and stayed in the old one: moved back, it would be delivered twice)."""
    go, at_eom = threading.Event(), threading.Event()

    def eom(data):
        at_eom.set()
        go.wait(30)
        yield pkt(b"a")
    r = relay_factory(f"non_smtpd_milters = {raw_milter({b'E': eom}).spec}\n")
    wait_until(maildrop(r).is_dir, 10, "maildrop/")
    drop(r, "INFLIGHT", "alice@example.test", ["bob@example.test"])
    assert at_eom.wait(20)
    old = replace_maildrop(r)
    go.set()
    wait_until(lambda: r.maildir_files("example.test/bob/"), 20, "delivery")
    wait_until(lambda: not any(old.iterdir()), 10, "the drop file's removal from the old maildrop/")
    assert len(r.maildir_files("example.test/bob/")) == 1


def test_sendmail_bs_queues_nothing_when_the_input_ends_inside_the_message(relay_factory):
    """-bs input that ends after DATA without the "." (or with a last "." that ends no line): nothing is
    queued and nothing answered, as smtpd drops a message whose connection is lost after DATA (it was queued
    and answered 250, cut off)."""
    r = relay_factory()
    for tail in (b"half a mess", b"half a message\r\n", b"half a message\r\n."):
        dialogue = (b"EHLO c\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                    b"Subject: cut\r\n\r\n" + tail)
        p = subprocess.run([BIN, "sendmail", "-bs", "-c", str(r.dir)], input=dialogue, capture_output=True,
                           timeout=30)
        assert p.returncode == 0, p.stderr
        assert p.stdout.endswith(b"\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"), p.stdout
    assert files_in(r, "maildrop", "new", "tmp", "hold") == []
    assert not r.maildir_files("example.test/bob/")


@pytest.mark.parametrize("line,reply", [
    (b"NOOP " + b"x" * 2043, b"250 2.0.0 Ok"),                       # 2,048 bytes and its CRLF: not too long
    (b"NOOP " + b"x" * 2044, b"500 5.5.2 Error: line too long"),
    (b"RSET\rQUIT", b"502 5.5.2 Error: command not recognized"),      # not cut at the CR
    (b"MAIL FROM:<alice@example.test>\0junk", b"501 5.5.2 Syntax error: control character in command argument"),
    (b"MAIL FROM:<alice@example.test>\rjunk", b"501 5.5.2 Syntax error: control character in command argument"),
], ids=["2048", "2049", "cr-verb", "nul-arg", "cr-arg"])
def test_sendmail_bs_command_lines_as_smtpd_reads_them(relay_factory, line, reply):
    """-bs reads a command line as smtpd does: line_length_limit counts the line without its CRLF, and a
    control character is refused with the whole line (a CR or NUL used to cut the command there, so
    "RSET\\rQUIT" ran RSET)."""
    r = relay_factory()
    p = subprocess.run([BIN, "sendmail", "-bs", "-c", str(r.dir)], input=b"EHLO c\r\n" + line + b"\r\nQUIT\r\n",
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.endswith(b"250 ENHANCEDSTATUSCODES\r\n" + reply + b"\r\n221 2.0.0 Bye\r\n"), p.stdout


MAIL = b"MAIL FROM:<alice@example.test>"


@pytest.mark.parametrize("setup,probe", [
    ([], MAIL + b" SIZE=999999 SIZE=5"),
    ([], MAIL + b" SIZE"),
    ([], MAIL + b" SIZE=9999999999999999999"),
    ([], MAIL + b" SIZE=5000"),
    ([], MAIL + b" SIZE=10\tBODY=8BITMIME"),
    ([], MAIL + b" FOO=bar"),
    ([], MAIL + b"SIZE=9"),
    ([], b"MAIL FROM:<\"x> SIZE=5000\"@example.test>"),
    ([], b"MAIL\tFROM:<alice@example.test\x01>"),
    ([MAIL], b"MAIL FROM:<bob@example.test> SIZE=999999"),
    ([MAIL], b"RCPT TO:<>"),
    ([MAIL, b"RCPT TO:<bob@example.test>"], b"RCPT TO:<bob2@example.test>"),
    ([], b""),
    ([], b"HELO a\x01b"),
    ([], b"FOO bar\x01"),
    ([], b"NOOP\tx"),
    ([], b"RSET "),
    ([], b"EHLO"),
    ([], b"HELOX"),
    ([], b"QUIT x"),
], ids=lambda v: repr(v)[:40] if isinstance(v, bytes) else str(len(v)))
def test_sendmail_bs_answers_each_command_as_smtpd_does(relay_factory, setup, probe):
    """-bs reads and answers a command as the daemon's smtpd does (one parser and the same replies): the
    same command after the same ones gets the same reply from both."""
    r = relay_factory("message_size_limit = 4000\nsmtpd_recipient_limit = 1\n")
    c = SmtpConn(r.port())
    c.ehlo()
    for line in setup:
        c.send(line + b"\r\n")
        assert c.reply()[:1] == "2", line
    c.send(probe + b"\r\n")
    smtpd = c.reply()
    dialogue = b"EHLO c\r\n" + b"".join(x + b"\r\n" for x in setup) + probe + b"\r\nQUIT\r\n"
    p = subprocess.run([BIN, "sendmail", "-bs", "-c", str(r.dir)], input=dialogue, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    finals = [ln.decode() for ln in p.stdout.split(b"\r\n") if ln[3:4] == b" "]
    assert finals[2 + len(setup)] == smtpd, (finals, smtpd)
