"""A TCP proxy on 127.0.0.1 in front of a test host, that resets the first connections it
accepts (a restarting sshd, a middlebox) and counts every connection: how many connect attempts
a client made is a fact the test reads, not a timing."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class ResetProxy:
    def __init__(self, target: tuple[str, int], *, reset_first: int = 1) -> None:
        self.target = target
        self.reset_first = reset_first   # -1: reset every connection
        self.accepted = 0
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.address, self.port = self._sock.getsockname()[:2]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True, name="reset-proxy")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.reset_first < 0 or self.accepted <= self.reset_first:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()   # RST, before the server's banner
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            self._conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()

    def __enter__(self) -> ResetProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
