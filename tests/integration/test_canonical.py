"""canonical_maps, sender_canonical_maps and recipient_canonical_maps with their classes (Postfix's
canonical(5), envelope addresses), propagate_unmatched_extensions for canonical, and
receive_override_options = no_address_mappings. The relayed envelope is read by an SMTP peer the test
runs; local copies in real Maildirs."""
import re

import pytest

from conftest import free_port, make_searchable, wait_until
from test_content_filter import QUEUE_CF, SmtpPeer, box, send


@pytest.fixture
def tables(tmp_path):
    def write(name, text):
        p = tmp_path / name
        p.write_text(text)
        make_searchable(p)
        return p
    return write


@pytest.fixture
def sink():
    s = SmtpPeer(free_port())
    yield s
    s.close()


def test_sender_and_recipient_canonical(relay_factory, tables, sink):
    sc = tables("sender_canonical", "alice@sender.example Alice.Smith@example.org\n")
    rc = tables("recipient_canonical", "old@example.test bob@example.test\nfar@example.test far@remote.test\n")
    r = relay_factory(QUEUE_CF + f"sender_canonical_maps = texthash:{sc}\nrecipient_canonical_maps = texthash:{rc}\n"
                      f"relayhost = [127.0.0.1]:{sink.port}\n")
    qid = send(r.port(), ["old@example.test", "far@example.test"], sender="alice@sender.example")
    wait_until(lambda: len(sink.messages) == 1 and len(box(r, "bob")) == 1, 15, "both copies")
    assert sink.messages[0][0] == "Alice.Smith@example.org"
    assert sink.messages[0][1] == ["far@remote.test"]
    # the copies arrive a moment before the queue manager logs them
    wait_until(lambda: re.search(rf"{qid}: to=<bob@example.test>, orig_to=<old@example.test>, relay=virtual", r.log())
               and re.search(rf"{qid}: to=<far@remote.test>, orig_to=<far@example.test>, relay=127.0.0.1", r.log()),
               10, "both delivery lines")
    assert f"{qid}: from=<Alice.Smith@example.org>" in r.log()


def test_canonical_maps_domain_and_extension(relay_factory, tables):
    c = tables("canonical", "@legacy.test @example.test\nboss@example.test alice@example.test\n")
    # smtpd checks the address as received (legacy.test must be a destination of ours); cleanup rewrites it
    r = relay_factory(f"canonical_maps = texthash:{c}\nrecipient_delimiter = +\nrelay_domains = legacy.test\n")
    # @domain keeps the local part (with its extension); alice+x@example.test is alice's mailbox
    qid = send(r.port(), ["alice+x@legacy.test"], sender="boss@example.test")
    assert len(box(r, "alice")) == 1
    log = r.log()
    assert f"{qid}: from=<alice@example.test>" in log
    assert f"{qid}: to=<alice+x@example.test>, orig_to=<alice+x@legacy.test>, relay=virtual" in log
    # boss+x@ has no entry: boss@ has, and the extension is propagated (canonical)
    qid = send(r.port(), ["boss+news@example.test"])
    assert f"{qid}: to=<alice+news@example.test>, orig_to=<boss+news@example.test>, relay=virtual" in r.log()
    assert len(box(r, "alice")) == 2


def test_canonical_classes(relay_factory, tables):
    c = tables("canonical", "boss@example.test alice@example.test\n")
    r = relay_factory(f"canonical_maps = texthash:{c}\ncanonical_classes = envelope_recipient\n")
    qid = send(r.port(), ["boss@example.test"], sender="boss@example.test")
    log = r.log()
    assert f"{qid}: from=<boss@example.test>" in log                    # not the sender's class
    assert f"{qid}: to=<alice@example.test>, orig_to=<boss@example.test>" in log


def test_no_address_mappings(relay_factory, tables):
    c = tables("canonical", "boss@example.test alice@example.test\n")
    r = relay_factory(f"canonical_maps = texthash:{c}\n",
                      services={"smtp": {"receive_override_options": "no_address_mappings"}})
    c2 = __import__("conftest").SmtpConn(r.port())
    c2.ehlo()
    c2.cmd("MAIL FROM:<boss@example.test>", 250)
    assert c2.cmd("RCPT TO:<boss@example.test>") == ("550 5.1.1 <boss@example.test>: Recipient address rejected: "
                                                     "User unknown in virtual mailbox table")
    c2.quit()
