"""Every failure answered: a full file system (a small tmpfs the test mounts and fills) gets
`452 4.3.1` for DATA, for BDAT in one chunk and in several (chunks of 8 KB and more, which used to be
spliced and dropped the connection), and for the queue; nothing partial is left in tmp/ or new/, and
the session goes on. Byte counts past 2^31 and 2^32 in BDAT are counted, not truncated."""
import os
import socket
import subprocess

import pytest

from conftest import SmtpConn

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path):
    """Fill the file system, then free 16 KB: room to open files, none for a message."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096) > 0:
            pass
    except OSError:
        pass
    os.close(fd)
    os.truncate(path / "filler", os.path.getsize(path / "filler") - 16 * 1024)


def session(relay):
    c = SmtpConn(sock=socket.create_connection(("127.0.0.1", relay.port()), timeout=30))
    assert c.cmd("EHLO client.test").startswith("250")
    return c


def files_under(path):
    out = []
    for root, _, names in os.walk(path):
        out += [os.path.join(root, n) for n in names if n != "filler"]
    return out


def test_full_disk_every_path(relay_factory, small_fs):
    r = relay_factory(f"virtual_mailbox_base = {small_fs}/mail\nqueue_directory = {small_fs}/queue\n"
                      "mynetworks = 127.0.0.0/8\nrelayhost = [127.0.0.1]:9\n")
    fill(small_fs)
    big = (b"x" * 998 + b"\r\n") * 200        # 200 KB
    full = "452 4.3.1 Error: insufficient system storage"
    c = session(r)
    # DATA
    assert c.cmd("MAIL FROM:<a@example.org>").startswith("250")
    assert c.cmd("RCPT TO:<x@localhost>").startswith("250")
    reply = c.cmd("DATA")
    if reply.startswith("354"):
        c.send(big + b".\r\n")
        reply = c.reply()
    assert reply == full
    # BDAT, one chunk
    assert c.cmd("MAIL FROM:<a@example.org>").startswith("250")
    assert c.cmd("RCPT TO:<x@localhost>").startswith("250")
    c.send(b"BDAT %d LAST\r\n" % len(big) + big)
    assert c.reply() == full
    # BDAT, several chunks: the failing chunk is answered, and so is every later one
    assert c.cmd("MAIL FROM:<a@example.org>").startswith("250")
    assert c.cmd("RCPT TO:<x@localhost>").startswith("250")
    replies = []
    for k in range(4):
        last = b" LAST" if k == 3 else b""
        c.send(b"BDAT %d%s\r\n" % (len(big), last) + big)
        replies.append(c.reply())
    assert replies[-1] == full, replies
    assert all(x.startswith("250 2.0.0 Ok: ") or x == full for x in replies), replies
    # the queue (a relayed recipient)
    assert c.cmd("MAIL FROM:<a@example.org>").startswith("250")
    assert c.cmd("RCPT TO:<someone@remote.test>").startswith("250")
    c.send(b"BDAT %d LAST\r\n" % len(big) + big)
    assert c.reply() == full
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    # nothing partial anywhere
    assert files_under(small_fs / "mail") == []
    for sub in ("tmp", "new", "status"):      # (public/ holds the queue manager's FIFO)
        assert files_under(small_fs / "queue" / sub) == [], sub
    # room again: the same session delivers
    os.unlink(small_fs / "filler")
    assert c.cmd("MAIL FROM:<a@example.org>").startswith("250")
    assert c.cmd("RCPT TO:<x@localhost>").startswith("250")
    c.send(b"BDAT %d LAST\r\n" % len(big) + big)
    assert c.reply().startswith("250 2.0.0 Ok: queued as")
    c.close()
    assert r.wait_log("delivery failed: No space left on device")


@pytest.mark.parametrize("size", [2**31 + 5, 2**32 + 5], ids=["2^31", "2^32"])
def test_bdat_counts_past_32_bits(relay_factory, size):
    """The whole chunk is read and counted in 64 bits: the reply comes after exactly `size` bytes, and
    the next command is understood."""
    r = relay_factory("message_size_limit = 1000000\n")
    c = session(r)
    assert c.cmd("MAIL FROM:<a@example.org>").startswith("250")
    assert c.cmd("RCPT TO:<x@localhost>").startswith("250")
    c.send(b"BDAT %d LAST\r\n" % size)
    block = b"y" * (1 << 20)
    left = size
    while left:
        n = min(left, len(block))
        c.sock.sendall(block[:n])
        left -= n
    c.send(b"NOOP\r\n")
    assert c.reply() == "552 5.3.4 Error: message file too big"
    assert c.reply() == "250 2.0.0 Ok"
    c.close()
    assert r.maildir_files() == []
