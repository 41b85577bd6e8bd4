"""A mail filter for the milter tests, on python3-milter (libmilter): one ACTION per process.

    python3 actions.py SOCKET ACTION RECORD

SOCKET is libmilter's form (inet:PORT@127.0.0.1, unix:/path). RECORD is a file that gets one JSON line
per event the filter saw (with the macros it was given), so a test can check what ktrelay sent.
ACTION is one of:
  continue         change nothing
  reject-connect   reject at connect           tempfail-connect  tempfail at connect
  reject-unknown   reply 550 5.5.1 to unknown commands
  reject-mail      reject MAIL                 reject-rcpt       reject recipients starting with "bad"
  reject           reject at end of message    tempfail          tempfail at end of message
  replycode        end of message: 550 5.7.1 with a two-line text
  discard          discard at end of message   quarantine        quarantine at end of message
  addheader        add X-Filter: one, insert X-First at 0, change Subject, delete X-Remove
  replacebody      replace the body
  addrcpt          add bob@example.test        delrcpt           remove alice@example.test
  chgfrom          change the sender to new-sender@example.org
  edit-all         add X-Local-Filter: seen, change the sender to changed@example.test, add
                   bob@example.test, replace the body with "replaced body"
  chain-a          add X-Chain: a              chain-b           add X-Seen-Chain: with X-Chain's value
  slow             sleep 5 s at the end of message, then continue
  count            headers and body without replies (SMFIP_NR_HDR, SMFIP_NR_BODY): record the body's size
                   and digest at the end of message
  close            exit during the body
"""
import hashlib
import json
import os
import sys
import time

import Milter

SOCKET, ACTION, RECORD = sys.argv[1], sys.argv[2], sys.argv[3]


def record(event, **kw):
    with open(RECORD, "a") as f:
        f.write(json.dumps({"event": event, **kw}) + "\n")


class Filter(Milter.Base):
    def __init__(self):
        self.headers = []
        self.body_hash = hashlib.sha256()
        self.body_len = 0

    def macros(self, names):
        return {n: self.getsymval(n) for n in names if self.getsymval(n) is not None}

    def connect(self, hostname, family, hostaddr):
        record("connect", hostname=hostname, addr=str(hostaddr[0]) if hostaddr else None,
               macros=self.macros(["j", "_", "{daemon_name}", "v", "{daemon_addr}"]))
        if ACTION == "reject-connect":
            return Milter.REJECT
        if ACTION == "tempfail-connect":
            return Milter.TEMPFAIL
        return Milter.CONTINUE

    def hello(self, name):
        record("helo", name=name, macros=self.macros(["{tls_version}", "{cipher}"]))
        return Milter.CONTINUE

    def unknown(self, cmd):
        record("unknown", cmd=cmd)
        if ACTION == "reject-unknown":
            self.setreply("550", "5.5.1", "say what")
            return Milter.REJECT
        return Milter.CONTINUE

    def envfrom(self, sender, *params):
        record("mail", sender=sender, params=list(params),
               macros=self.macros(["i", "{mail_addr}", "{auth_authen}", "{auth_type}"]))
        if ACTION == "reject-mail":
            return Milter.REJECT
        return Milter.CONTINUE

    def envrcpt(self, rcpt, *params):
        record("rcpt", rcpt=rcpt, macros=self.macros(["i", "{rcpt_addr}"]))
        if ACTION == "reject-rcpt" and rcpt.strip("<>").startswith("bad"):
            self.setreply("550", "5.1.1", "no such user here")
            return Milter.REJECT
        return Milter.CONTINUE

    def header(self, name, value):
        self.headers.append([name, value])
        return Milter.CONTINUE

    def eoh(self):
        record("eoh", headers=self.headers, macros=self.macros(["i"]))
        return Milter.CONTINUE

    def body(self, chunk):
        if ACTION == "close":
            os._exit(0)
        return Milter.CONTINUE

    def abort(self):
        record("abort")
        return Milter.CONTINUE

    def eom(self):
        record("eom", macros=self.macros(["i"]))
        if ACTION == "reject":
            return Milter.REJECT
        if ACTION == "tempfail":
            return Milter.TEMPFAIL
        if ACTION == "replycode":
            self.setreply("550", "5.7.1", "first line", "second line")
            return Milter.REJECT
        if ACTION == "discard":
            return Milter.DISCARD
        if ACTION == "quarantine":
            self.quarantine("held by test")
        if ACTION == "addheader":
            self.addheader("X-Filter", "one")
            self.addheader("X-First", "zero", 0)
            self.chgheader("Subject", 1, "changed subject")
            self.chgheader("X-Remove", 1, "")
        if ACTION == "replacebody":
            self.replacebody(b"new body line 1\r\nnew body line 2\r\n")
        if ACTION == "addrcpt":
            self.addrcpt("<bob@example.test>")
        if ACTION == "delrcpt":
            self.delrcpt("<alice@example.test>")
        if ACTION == "chgfrom":
            self.chgfrom("<new-sender@example.org>")
        if ACTION == "edit-all":
            self.addheader("X-Local-Filter", "seen")
            self.chgfrom("<changed@example.test>")
            self.addrcpt("<bob@example.test>")
            self.replacebody(b"replaced body\r\n")
        if ACTION == "chain-a":
            self.addheader("X-Chain", "a")
        if ACTION == "chain-b":
            seen = [v for n, v in self.headers if n.lower() == "x-chain"]
            self.addheader("X-Seen-Chain", seen[0] if seen else "none")
        if ACTION == "slow":
            time.sleep(5)
        return Milter.CONTINUE


class CountFilter(Filter):
    @Milter.noreply
    def header(self, name, value):
        self.headers.append([name, value])
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk):
        self.body_hash.update(chunk)
        self.body_len += len(chunk)
        return Milter.CONTINUE

    def eom(self):
        record("eom", size=self.body_len, sha256=self.body_hash.hexdigest(), headers=len(self.headers))
        return Milter.CONTINUE


Milter.factory = CountFilter if ACTION == "count" else Filter
Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY | Milter.ADDRCPT | Milter.DELRCPT
                 | Milter.QUARANTINE | Milter.CHGFROM)
Milter.runmilter("ktrelay-test", SOCKET, 60)
