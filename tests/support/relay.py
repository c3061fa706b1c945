"""A byte relay in front of a real service that a test can cut and restore.

wunderproxy is pointed at the relay (``DOCKER_HOST=unix://...`` or
``AWS_ENDPOINT_URL=http://127.0.0.1:PORT``); cutting it makes the real Docker engine or S3
server unreachable for wunderproxy alone, while the app container keeps running.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path


class Relay:
    """Accepts on ``listen`` and copies bytes both ways to ``target``."""

    def __init__(self, listen: str | tuple[str, int], target: str | tuple[str, int]) -> None:
        self._listen_address = listen
        self._target = target
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()

    @property
    def port(self) -> int:
        assert isinstance(self._listen_address, tuple)
        return self._listen_address[1]

    def start(self) -> Relay:
        family = socket.AF_UNIX if isinstance(self._listen_address, str) else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            Path(str(self._listen_address)).unlink(missing_ok=True)
        listener.bind(self._listen_address)
        if family == socket.AF_INET:
            self._listen_address = listener.getsockname()
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        """Stop accepting and drop every relayed connection: the service is unreachable."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            if isinstance(self._listen_address, str):
                Path(self._listen_address).unlink(missing_ok=True)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        """Accept again on the same address."""
        self.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            family = socket.AF_UNIX if isinstance(self._target, str) else socket.AF_INET
            upstream = socket.socket(family, socket.SOCK_STREAM)
            try:
                upstream.connect(self._target)
            except OSError:
                client.close()
                upstream.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._copy, args=(source, sink), daemon=True).start()

    def _copy(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
            source.close()
