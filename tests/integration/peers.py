"""The scripted peers' common parts: the tests run their own SMTP next hops, content filters and sinks
(each test file scripts the replies it needs); this module holds what they share, the listening socket
with its accept loop (TcpPeer) and the reading of a DATA section (read_data_lines). What a peer answers
stays in the test file that scripts it."""
import socket
import threading


class TcpPeer:
    """A TCP server on (host, port) for a scripted peer; port None or 0: a free one, and .port says which
    once listen() has run. One thread accepts, and each connection runs self.session(sock) on a thread of
    its own (a subclass defines session). reuse_addr sets SO_REUSEADDR, for a peer that must come back on
    the same port. .lock is the subclass's lock for what the sessions record.

    A subclass sets up its own fields and then calls listen() (or leaves that to its start()); close()
    stops accepting and frees the port, sessions under way end with their connection."""

    def __init__(self, host="127.0.0.1", port=None, backlog=16, reuse_addr=False):
        self.host, self.port, self.backlog, self.reuse_addr = host, port or 0, backlog, reuse_addr
        self.lock = threading.Lock()
        self.sock = None

    def listen(self):
        sock = socket.socket()
        if self.reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(self.backlog)
        self.port = sock.getsockname()[1]
        self.sock = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
        return self

    def _accept(self, sock):
        while True:
            try:
                s, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self.session, args=(s,), daemon=True).start()

    def session(self, s):
        raise NotImplementedError

    def close(self):
        if self.sock is None:
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)     # wakes the accepting thread, which lets the port go
        except OSError:
            pass
        self.sock.close()
        self.sock = None


def read_data_lines(f):
    """After a 354: the lines of the DATA section from the binary file f, as sent (dot-stuffed, with
    their CRLF), up to the line "." (not included). Returns (lines, ended): ended is False when the
    connection ended before the ".", lines then holding what came."""
    lines = []
    while True:
        line = f.readline()
        if not line:
            return lines, False
        if line == b".\r\n":
            return lines, True
        lines.append(line)
