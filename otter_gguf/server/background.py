"""Serving an ASGI app from a thread of this process (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

__all__ = ["BackgroundServer", "listen_socket"]


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn (``port`` 0: an ephemeral port, known before the start).
    asyncio sets ``TCP_NODELAY`` on the accepted connections itself."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class BackgroundServer:
    """uvicorn serving ``app`` on ``host`` at an ephemeral port, in a daemon thread.

    ``with BackgroundServer(app) as s: s.url`` -> ``"http://127.0.0.1:<port>"``;
    leaving the block shuts it down (lifespan shutdown included).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 120.0):
        import uvicorn

        self._sock = listen_socket(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="uvicorn", daemon=True)
        self._timeout = startup_timeout

    def start(self) -> "BackgroundServer":
        self._thread.start()
        t_end = time.monotonic() + self._timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > t_end:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
