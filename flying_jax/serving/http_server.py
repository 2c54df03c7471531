"""The HTTP API's listener: uvicorn on the gRPC server's event loop, one process, one engine.

uvicorn normally owns the process: it installs SIGINT / SIGTERM handlers (and re-raises the
signal when it stops) and exits on a bind error. Here the flying-jax `Server` owns both: it
drains on SIGTERM before anything stops, and a port in use is an OSError its caller reports. So
the socket is bound here, and uvicorn runs as a task without its signal handling; `stop()` asks
it to finish the responses in flight (up to `grace_s`, then they are cancelled, which aborts
their requests) and waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

log = logging.getLogger("flying_jax")


class _Embedded(uvicorn.Server):
  """uvicorn without its signal handlers (the flying-jax server's own handle SIGTERM)."""

  @contextlib.contextmanager
  def capture_signals(self):
    yield


def _bind(host: str, port: int) -> socket.socket:
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise OSError(f"cannot bind the HTTP API to {host}:{port}: {e.strerror or e}") from None
  return sock


class HttpServer:
  def __init__(self, app, host: str, port: int, grace_s: int = 1):
    self.app, self.host, self.port, self.grace_s = app, host, port, grace_s
    self._server: _Embedded | None = None
    self._task: asyncio.Task | None = None

  async def start(self) -> int:
    """Bind, start serving on the running loop; returns the port bound (for port 0)."""
    sock = _bind(self.host, self.port)
    self.port = sock.getsockname()[1]
    config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False,
                            http="h11", ws="none", interface="asgi3",
                            timeout_graceful_shutdown=self.grace_s)
    self._server = server = _Embedded(config)
    self._task = asyncio.create_task(server.serve(sockets=[sock]), name="flying-jax-http")
    while not server.started:
      if self._task.done():
        self._task.result()                # raises what stopped it
        raise OSError(f"the HTTP API on {self.host}:{self.port} stopped while starting")
      await asyncio.sleep(0.01)
    log.info("HTTP API on http://%s:%d", self.host, self.port)
    return self.port

  async def stop(self):
    if self._server is None or self._task is None:
      return
    self._server.should_exit = True
    await self._task
    self._server = self._task = None


__all__ = ["HttpServer"]
