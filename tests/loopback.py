"""An ASGI app served by uvicorn in a thread on 127.0.0.1, for tests that need a misbehaving server."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

LOOPBACK = "127.0.0.1"


class ThreadedServer:
    """Serve ``app`` on a loopback socket bound before the thread starts (so the port cannot be taken)."""

    def __init__(self, app, name: str = "test server") -> None:
        self.name = name
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((LOOPBACK, 0))
        self.url = f"http://{LOOPBACK}:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def start(self, timeout_s: float = 20) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 20) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._socket.close()
        assert not self._thread.is_alive(), f"{self.name} thread did not stop"
