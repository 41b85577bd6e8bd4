"""The queue manager's scheduling: messages handed over by SMTP sessions in memory, other processes'
messages through public/qmgr, no status records for delivered mail, destination concurrency that
starts at initial_destination_concurrency and grows with success, an administrator's delete, and
kill -9 in the middle of a bulk relay. The next hop is a small SMTP server in this file that records
every connection and transaction (so the tests can see concurrency and reuse), or Postfix's smtp-sink."""
import asyncio
import os
import re
import signal
import smtplib
import threading
import time

import pytest

from conftest import made_by_test
from test_relay import SINK, nodes, sinks, wait_for  # noqa: F401 (fixtures)

BODY = b"Subject: qmgr test\r\n\r\nline\r\n"


class RecordingSink:
    """An SMTP next hop on loopback that answers everything with 250 (the end of data after `delay`
    seconds) and records, in order, ("open", n_open), ("done", n_open, tag) and ("close", n_open)."""

    def __init__(self, delay=0.0, close_after_first=False):
        self.delay = delay
        self.close_after_first = close_after_first
        self.events = []
        self.messages = []
        self.open = 0
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.port = None
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(asyncio.start_server(self.session, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()
            self.loop.run_forever()
            self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(5)

    def record(self, *ev):
        with self.lock:
            self.events.append(ev)

    async def session(self, reader, writer):
        with self.lock:
            self.open += 1
            self.events.append(("open", self.open))
        try:
            writer.write(b"220 sink ESMTP\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    break
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-sink\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    await writer.drain()
                    data = []
                    while True:
                        l = await reader.readline()
                        if not l or l == b".\r\n":
                            break
                        data.append(l)
                    if not l:
                        break           # the client went away in the middle: no message
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    msg = b"".join(data)
                    m = re.search(rb"X-Tag: (\S+)", msg)
                    with self.lock:
                        self.messages.append(msg)
                        self.events.append(("done", self.open, m.group(1).decode() if m else ""))
                    writer.write(b"250 2.0.0 Ok\r\n")
                    if self.close_after_first:
                        # an idle timeout on the peer's side: gone without a word
                        await writer.drain()
                        break
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        finally:
            with self.lock:
                self.open -= 1
                self.events.append(("close", self.open))
            writer.close()

    async def shutdown(self):
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.loop.stop()

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.shutdown(), self.loop)
        self.thread.join(5)


@pytest.fixture
def recording_sink():
    yield from made_by_test(RecordingSink, end="stop")


def send_over_smtp(port, tags, per_connection=25):
    """Relayed messages over SMTP (a permitted client); returns the queue ids of the 250 replies."""
    ids = []
    for k in range(0, len(tags), per_connection):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.ehlo("client.test")
            for t in tags[k:k + per_connection]:
                c.mail("alice@example.test")
                c.rcpt(f"{t}@remote.test")
                code, msg = c.data(b"X-Tag: " + t.encode() + b"\r\n" + BODY)
                assert code == 250, msg
                ids.append(re.search(r"queued as (\S+)", msg.decode()).group(1))
    return ids


def test_smtp_handoff_delivers_from_memory_without_records(nodes, recording_sink):
    """Mail queued by SMTP sessions goes out at once, many messages per connection; delivered mail
    leaves no status record behind and the queue is empty afterwards."""
    sink = recording_sink()
    n = nodes(f"mynetworks = 127.0.0.0/8\nrelayhost = [127.0.0.1]:{sink.port}\n"
              # a deferred-queue run once an hour: only the handover can start these deliveries
              "queue_run_delay = 1h\nminimal_backoff_time = 1h\nmaximal_backoff_time = 2h\n").start()
    status = n.d / "queue" / "status"
    seen_status = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen_status.extend(os.listdir(status) if status.exists() else [])
            time.sleep(0.01)

    w = threading.Thread(target=watch)
    w.start()
    tags = [f"m{i}" for i in range(200)]
    try:
        ids = send_over_smtp(n.r.port(), tags)
        assert n.wait_log(r"status=sent", count=200, timeout=30), n.log()[-3000:]
        assert wait_for(lambda: n.queue_files() == [])
    finally:
        stop.set()
        w.join()
    assert sorted(t for ev in sink.events if ev[0] == "done" for t in [ev[2]]) == sorted(tags)
    assert seen_status == [] and os.listdir(status) == []
    log = n.log()
    assert len(ids) == 200 and len(re.findall(r": removed\n", log)) == 200
    assert "queue manager started: 0 messages" in log
    # connection reuse: far fewer connections than messages
    opened = sum(1 for ev in sink.events if ev[0] == "open")
    assert 1 <= opened <= 20, opened


def test_concurrency_starts_low_and_grows(nodes, recording_sink):
    """initial_destination_concurrency connections at first; the window grows by 1/window per
    delivery up to default_destination_concurrency_limit, and never beyond it."""
    sink = recording_sink(delay=0.15)
    n = nodes(f"mynetworks = 127.0.0.0/8\nrelayhost = [127.0.0.1]:{sink.port}\n"
              "initial_destination_concurrency = 1\ndefault_destination_concurrency_limit = 4\n").start()
    tags = [f"c{i}" for i in range(40)]
    send_over_smtp(n.r.port(), tags, per_connection=40)
    assert n.wait_log(r"status=sent", count=40, timeout=60), n.log()[-3000:]
    with sink.lock:
        events = list(sink.events)
    first_done = next(i for i, ev in enumerate(events) if ev[0] == "done")
    # until the first delivery completed, one connection
    assert max(ev[1] for ev in events[:first_done + 1]) == 1, events[:first_done + 1]
    peak = max(ev[1] for ev in events)
    assert peak == 4, events
    # the window after k deliveries: w(0) = 1, w(k+1) = min(4, w(k) + 1/w(k)); a connection is only
    # opened while the open ones are fewer than floor(w) (the sink sees deliveries before ktrelay does)
    w, done = 1.0, 0
    for ev in events:
        if ev[0] == "done":
            done += 1
            w = min(4.0, w + 1.0 / w)
        elif ev[0] == "open":
            assert ev[1] <= int(w), (ev, done, w)


def test_sendmail_is_picked_up_through_the_fifo(nodes, sinks):
    """`ktrelay sendmail` while the server runs: delivered at once although no queue run is due for
    an hour (public/qmgr, not a directory scan)."""
    sink = sinks().start()
    n = nodes(f"relayhost = [127.0.0.1]:{sink.port}\nqueue_run_delay = 1h\n"
              "minimal_backoff_time = 1h\nmaximal_backoff_time = 2h\n").start()
    assert n.wait_log(r"queue manager started"), n.log()
    assert (n.d / "queue" / "public" / "qmgr").is_fifo()
    t0 = time.time()
    qid = n.sendmail(["bob@remote.test"], b"Subject: fifo\n\nx\n")
    assert n.wait_log(rf"{qid}: to=<bob@remote.test>, .*status=sent", timeout=5), n.log()
    assert time.time() - t0 < 5
    assert n.wait_log(rf"{qid}: removed")
    assert len(sink.messages()) == 1


def test_queue_delete_while_deferred(nodes, sinks):
    """An administrator deletes a deferred message while the server runs: its retry finds the file
    gone, nothing is sent and the manager forgets it."""
    sink = sinks()
    n = nodes(f"relayhost = [127.0.0.1]:{sink.port}\nminimal_backoff_time = 1h\nmaximal_backoff_time = 2h\n"
              "queue_run_delay = 1h\n").start()
    qid = n.sendmail(["bob@remote.test"], BODY)
    assert n.wait_log(rf"{qid}: .*status=deferred"), n.log()
    p = n.queue("delete", qid)
    assert p.returncode == 0, p.stderr
    sink.start()
    assert n.queue("flush").returncode == 0
    assert n.wait_log(rf"{qid}: removed from the queue by the administrator"), n.log()
    assert sink.messages() == []
    # a later message still goes out
    q2 = n.sendmail(["carol@remote.test"], BODY)
    assert n.wait_log(rf"{q2}: .*status=sent"), n.log()


def test_kill_9_during_bulk_relay_loses_nothing(nodes, recording_sink):
    """kill -9 while many relayed messages are in flight (the next hop is slow): after the restart,
    which loads the queue from disk once, every message that got its 250 reaches the next hop."""
    sink = recording_sink(delay=0.05)
    extra = (f"mynetworks = 127.0.0.0/8\nrelayhost = [127.0.0.1]:{sink.port}\n"
             "initial_destination_concurrency = 2\ndefault_destination_concurrency_limit = 2\n")
    n = nodes(extra).start()
    tags = [f"k{i}" for i in range(120)]
    send_over_smtp(n.r.port(), tags, per_connection=60)
    # some are out, many are still queued
    assert wait_for(lambda: len(sink.messages) >= 10, timeout=20)
    n.stop(sig=signal.SIGKILL)
    left = len(n.queue_files())
    assert left > 0
    n.start()
    assert n.wait_log(rf"queue manager started: {left} messages", timeout=10), n.log()
    assert wait_for(lambda: n.queue_files() == [], timeout=60), n.log()[-3000:]
    got = {ev[2] for ev in sink.events if ev[0] == "done"}
    assert got == set(tags)


def test_dead_cached_connection_is_not_the_messages_fault(nodes, recording_sink):
    """The next hop closes a connection while ktrelay keeps it cached for more mail: the next message
    goes out at once on a new connection instead of being deferred for minimal_backoff_time."""
    sink = recording_sink(close_after_first=True)
    n = nodes(f"mynetworks = 127.0.0.0/8\nrelayhost = [127.0.0.1]:{sink.port}\n"
              "minimal_backoff_time = 1h\nmaximal_backoff_time = 2h\nqueue_run_delay = 1h\n").start()
    send_over_smtp(n.r.port(), ["d1"])
    assert n.wait_log(r"to=<d1@remote.test>, .*status=sent"), n.log()
    # the peer has closed; ktrelay still holds the connection (cached for 2 s)
    assert wait_for(lambda: ("close", 0) in sink.events)
    send_over_smtp(n.r.port(), ["d2"])
    assert n.wait_log(r"to=<d2@remote.test>, .*status=sent", timeout=10), n.log()
    assert "status=deferred" not in n.log()
    assert sum(1 for ev in sink.events if ev[0] == "open") == 2
    assert sorted(ev[2] for ev in sink.events if ev[0] == "done") == ["d1", "d2"]
