"""Hostile content against the header and body checks: header text copied by $n into replies, stored
headers and envelopes (folded headers bring line ends, a client chooses the bytes)."""
import re

import pytest

from conftest import SmtpConn
from test_checks import box_files, msg, queue_id_of, send

HC = r"""
/^Subject: reject ([^!]*)/           REJECT bad subject $1
/^Subject: replace ([^!]*)/          REPLACE Subject: [tagged] $1
/^Subject: prepend ([^!]*)/          PREPEND X-Was: $1
/^X-Redirect: ([^!]*)/               REDIRECT $1
/^X-Filter: ([^!]*)/                 FILTER $1
"""


@pytest.fixture
def hostile(relay_factory, tmp_path):
    (tmp_path / "hc").write_text(HC)
    return relay_factory(f"""\
header_checks = pcre:{tmp_path}/hc
queue_run_delay = 1s
""")


def raw_reply(relay, body):
    c = SmtpConn(relay.port())
    c.ehlo("client.example.net")
    c.cmd("MAIL FROM:<sender@example.org>", 250)
    c.cmd("RCPT TO:<alice@example.test>", 250)
    c.cmd("DATA", 354)
    c.send(body.encode() + b".\r\n")
    data, c.buf = c.buf, b""
    while not data.endswith(b"\r\n"):
        chunk = c.sock.recv(4096)
        assert chunk, data
        data += chunk
    c.cmd("QUIT", 221)
    return data


def test_reject_text_from_a_folded_header_is_one_reply_line(hostile):
    data = raw_reply(hostile, msg("reject one\r\n\ttwo"))
    assert data == b"550 5.7.1 bad subject one two\r\n"
    log = hostile.log()
    assert "reject: header Subject: reject one\ttwo from unknown[127.0.0.1]" in log
    assert not re.search(r"^\ttwo", log, re.M)


def test_replace_and_prepend_with_a_folded_header_store_crlf_only(hostile):
    r = send(hostile, msg("replace one\r\n\ttwo"))
    assert queue_id_of(r), r
    r = send(hostile, msg("prepend three\r\n four"))
    assert queue_id_of(r), r
    files = sorted(box_files(hostile), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2
    first, second = (f.read_bytes() for f in files)
    assert b"\nSubject: [tagged] one\r\n\ttwo\r\n" in first
    assert b"\nX-Was: three\r\n four\r\nSubject: prepend three\r\n four\r\n" in second
    for b in (first, second):
        assert b.count(b"\n") == b.count(b"\r\n")


def test_redirect_and_filter_to_odd_values_are_ignored(hostile):
    for hdr in ("X-Redirect: bob@example.test\r\n\tcarol@example.test",
                "X-Redirect: bob@example.test carol@example.test",
                "X-Filter: smtp:[127.0.0.1]:25\r\n\trcpt evil@example.net"):
        r = send(hostile, msg("plain", hdr + "\r\n"))
        assert queue_id_of(r), r
    log = hostile.log()
    assert "redirect:" not in log and "filter:" not in log, log[-3000:]
    assert len(box_files(hostile)) == 3
    assert box_files(hostile, "bob") == [] and box_files(hostile, "carol") == []
