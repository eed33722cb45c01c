"""The TCP target behind both proxies: one process, one thread, epoll.

It runs apart from the client (``python -m bench.target``) so that the two do not share
an interpreter, and it is deliberately plain: non-blocking sockets and
:mod:`selectors`, no framework, so it costs little CPU per byte and per message. Bulk
data never passes through Python: the source is sent with ``sendfile(2)`` from an
in-memory file, and the sink discards with ``recv(MSG_TRUNC)``, which TCP honours
without copying. The target then shares a core with the client and still outruns the
proxies.

What a connection gets is chosen by the first bytes relayed to it (see :mod:`bench.wire`):

- ``D`` (downstream source): each following 8-byte big-endian count adds that many bytes
  to send; the client asks for more while it reads, so the stream never stalls and the
  total is exact.
- ``U`` + 8-byte ``N`` (upstream sink): everything after is discarded; one byte ``A``
  goes back per ``N`` bytes received, so the client knows when its data has arrived.
- ``E`` (echo): everything after is sent back.

The target prints its port on stdout, then serves until its stdin closes: when the
bench exits, however it exits, the pipe closes and the target follows.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys

from bench.procstat import raise_fd_limit
from bench.wire import ACK, COUNT, MODE_DOWN, MODE_ECHO, MODE_UP

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
SOURCE_SIZE = 1 << 20
MAX_PENDING = 4 << 20  # echo output held before the target stops reading that client


class Conn:
    """One relayed connection and what the target still owes it."""

    __slots__ = (
        "ack_every",
        "acked",
        "events",
        "header",
        "mode",
        "pending",
        "sink",
        "sock",
        "to_send",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.mode = 0  # the first byte received: MODE_DOWN, MODE_UP or MODE_ECHO
        self.header = bytearray()  # bytes of an 8-byte count not complete yet
        self.pending = bytearray()  # echo or ack bytes not sent yet
        self.to_send = 0  # D mode: source bytes still owed
        self.sink = 0  # U mode: bytes received
        self.ack_every = 0
        self.acked = 0
        self.events = READ


class Target:
    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.buffer = bytearray(1 << 20)
        self.view = memoryview(self.buffer)
        self.source = os.memfd_create("bench-source")  # 1 MiB of a recognisable pattern
        os.write(self.source, bytes(range(256)) * (SOURCE_SIZE // 256))

    def serve(self) -> None:
        self.selector.register(self.listener, READ, None)
        self.selector.register(sys.stdin.fileno(), READ, "stdin")
        while True:
            for key, mask in self.selector.select(timeout=1.0):
                if key.data is None:
                    self._accept()
                elif key.data == "stdin":
                    if not os.read(sys.stdin.fileno(), 4096):
                        return
                else:
                    conn: Conn = key.data
                    try:
                        if mask & READ and not self._readable(conn):
                            self._close(conn)
                            continue
                        if mask & WRITE:
                            self._flush(conn)
                    except OSError:
                        self._close(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError:  # e.g. EMFILE: leave it in the backlog, retry on the next event
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock)
            self.selector.register(sock, READ, conn)

    def _readable(self, conn: Conn) -> bool:
        """Read once and act on it; False on EOF."""
        if conn.mode == MODE_UP and conn.ack_every:  # pure payload: discard uncopied
            n = conn.sock.recv_into(self.buffer, len(self.buffer), socket.MSG_TRUNC)
            if n == 0:
                return False
            self._count(conn, n)
            self._flush(conn)
            return True
        n = conn.sock.recv_into(self.buffer)
        if n == 0:
            return False
        data = self.view[:n]
        if conn.mode == 0:
            conn.mode = data[0]
            data = data[1:]
        if conn.mode == MODE_ECHO:
            conn.pending += data
        elif conn.mode == MODE_UP:
            self._sink(conn, data)
        elif conn.mode == MODE_DOWN:
            conn.header += data
            while len(conn.header) >= COUNT.size:
                conn.to_send += COUNT.unpack_from(conn.header)[0]
                del conn.header[: COUNT.size]
        else:
            return False  # not one of ours
        self._flush(conn)
        return True

    @staticmethod
    def _sink(conn: Conn, data: memoryview) -> None:
        if conn.ack_every == 0:  # still reading the 8-byte ack interval
            need = COUNT.size - len(conn.header)
            conn.header += data[:need]
            data = data[need:]
            if len(conn.header) < COUNT.size:
                return
            conn.ack_every = COUNT.unpack(conn.header)[0]
            conn.header.clear()
        Target._count(conn, len(data))

    @staticmethod
    def _count(conn: Conn, n: int) -> None:
        conn.sink += n
        due = conn.sink // conn.ack_every - conn.acked
        if due:
            conn.pending += ACK * due
            conn.acked += due

    def _flush(self, conn: Conn) -> None:
        """Send what is owed until the socket is full, then watch for writability."""
        sock = conn.sock
        try:
            if conn.pending:
                sent = sock.send(conn.pending)
                del conn.pending[:sent]
            while conn.to_send and not conn.pending:
                sent = os.sendfile(sock.fileno(), self.source, 0, min(conn.to_send, SOURCE_SIZE))
                conn.to_send -= sent
        except BlockingIOError:
            pass
        wanted = READ if len(conn.pending) < MAX_PENDING else 0
        if conn.pending or conn.to_send:
            wanted |= WRITE
        if wanted != conn.events:
            conn.events = wanted
            self.selector.modify(sock, wanted, conn)

    def _close(self, conn: Conn) -> None:
        self.selector.unregister(conn.sock)
        conn.sock.close()


def main() -> None:
    raise_fd_limit()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    print(listener.getsockname()[1], flush=True)
    Target(listener).serve()


if __name__ == "__main__":
    main()
