"""The gRPC server: one engine on its own thread, a grpc.aio server, health, reflection, metrics.

`Server` owns the lifecycle: `start()` binds and marks the health service SERVING (the engine is
already compiled and warmed when it is built); `begin_drain()` stops admissions and marks it
NOT_SERVING; `shutdown()` drains, waits for the running requests up to a grace period, stops the
RPC server and the engine thread. `serve_forever` adds SIGTERM / SIGINT handling for the CLI, and
`ServerThread` runs a server on a background event loop (tests, notebooks). With `http_port` the
same lifecycle runs the OpenAI-compatible HTTP API (`openai_api`) on the same loop and engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from flying_jax.engine.engine import Engine
from flying_jax.serving import requests as R
from flying_jax.serving import servicers
from flying_jax.serving.loop import EngineLoop
from flying_jax.serving.malformed import RejectMalformed
from flying_jax.serving.metrics import ServingMetrics
from flying_jax.serving.proto import flying_jax_pb2 as pb
from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc
from flying_jax.serving.proto import jetstream_pb2_grpc as js_grpc

log = logging.getLogger("flying_jax")

SERVICES = ("flying_jax.v1.Generation", "flying_jax.v1.Admin", "jetstream_proto.Orchestrator")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  host: str = "127.0.0.1"               # loopback unless told otherwise
  port: int = 50051                     # 0: any free port
  max_waiting: int = 256                # bounded queue: beyond it, RESOURCE_EXHAUSTED
  max_prompt_tokens: int | None = None  # default: the model's context
  default_max_tokens: int = 64
  max_message_bytes: int = 4 * 2**20
  admin_token: str | None = None        # None: the admin service refuses every call
  tls_cert: str | None = None           # PEM files; both or neither
  tls_key: str | None = None
  metrics_port: int | None = None       # Prometheus /metrics over HTTP
  drain_grace_s: float = 30.0           # SIGTERM: running requests get this long to finish
  policy: str | None = None             # the policy the engine started with (admin release)
  http_port: int | None = None          # the OpenAI-compatible HTTP API (0: any free port)
  http_host: str | None = None          # default: the gRPC host
  api_key: str | None = None            # the HTTP API's /v1 routes want 'Bearer KEY'


class Server:
  def __init__(self, engine: Engine, tokenizer, config: ServeConfig = ServeConfig(),
               versions: dict | None = None):
    if bool(config.tls_cert) != bool(config.tls_key):
      raise ValueError("TLS needs both a certificate and a key file")
    self.engine, self.tokenizer, self.config = engine, tokenizer, config
    self.vocab = engine.card.arch.vocab_size
    self.limits = R.Limits(config.max_prompt_tokens or engine.card.arch.max_context,
                           config.default_max_tokens)
    self.versions = versions or {}
    self.metrics = ServingMetrics(engine.card.name)
    self.loop = EngineLoop(engine, config.max_waiting, self.metrics)
    self.draining = False
    self._started = False
    self.port: int | None = None
    self._grpc: grpc.aio.Server | None = None
    self._health = health.aio.HealthServicer()
    self._http = None
    self.metrics_port: int | None = None
    self._api = None                      # the OpenAI-compatible HTTP API (http_server)
    self.http_port: int | None = None

  # lifecycle -----------------------------------------------------------------------------------
  async def start(self) -> int:
    cfg = self.config
    opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes)]
    self._grpc = server = grpc.aio.server(options=opts, interceptors=[RejectMalformed()])
    pb_grpc.add_GenerationServicer_to_server(servicers.Generation(self), server)
    pb_grpc.add_AdminServicer_to_server(servicers.Admin(self), server)
    js_grpc.add_OrchestratorServicer_to_server(servicers.Orchestrator(self), server)
    health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
    reflection.enable_server_reflection(
        SERVICES + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME), server)
    address = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert:
      with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
        creds = grpc.ssl_server_credentials([(k.read(), c.read())])
      self.port = server.add_secure_port(address, creds)
    else:
      self.port = server.add_insecure_port(address)
    if not self.port:
      raise OSError(f"cannot bind {address}")
    self.loop.start()
    await server.start()
    if cfg.metrics_port is not None:
      self._http = self.metrics.serve_http(cfg.metrics_port, cfg.host)
      self.metrics_port = self._http.server_port
    if cfg.http_port is not None:
      try:
        await self._start_api()
      except BaseException:                 # e.g. its port in use: stop what started, say why
        await server.stop(grace=0)
        self.loop.stop()
        if self._http is not None:
          self._http.shutdown()
        raise
    await self._set_health(health_pb2.HealthCheckResponse.SERVING)
    self._started = True
    log.info("serving %s on %s:%d", self.engine.card.name, cfg.host, self.port)
    return self.port

  async def _start_api(self):
    """The HTTP API on this loop and this engine loop (imported here: gRPC alone needs none
    of FastAPI)."""
    from flying_jax.serving.http_server import HttpServer
    from flying_jax.serving.openai_api import build_app

    cfg = self.config
    self._api = HttpServer(build_app(self), cfg.http_host or cfg.host, cfg.http_port)
    self.http_port = await self._api.start()

  async def _set_health(self, status):
    for name in ("",) + SERVICES:
      await self._health.set(name, status)

  async def begin_drain(self):
    """No new requests from now on; health says NOT_SERVING."""
    if self.draining:
      return
    self.draining = self.loop.draining = True
    await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    log.info("draining: no new requests")

  async def shutdown(self, grace_s: float | None = None):
    """Drain, let running requests finish (up to the grace period), then stop everything."""
    grace = self.config.drain_grace_s if grace_s is None else grace_s
    await self.begin_drain()
    deadline = time.monotonic() + grace
    while not self.loop.idle() and time.monotonic() < deadline:
      await asyncio.sleep(0.05)
    if self._grpc is not None:
      await self._grpc.stop(grace=1.0)
    if self._api is not None:
      await self._api.stop()
    self.loop.stop()
    if self._http is not None:
      self._http.shutdown()
    log.info("stopped")

  @property
  def serving(self) -> bool:
    return self._started and not self.draining

  # what the services read ----------------------------------------------------------------------
  def info(self) -> pb.ServerInfo:
    e = self.engine
    return pb.ServerInfo(
        model=e.card.name, model_description=e.card.description, vocab_size=self.vocab,
        max_context=e.card.arch.max_context, mesh=e.preset.name, platform=e.preset.platform,
        devices=len(e.devices), partitions=list(e.partitions),
        decode_buckets=list(e.preset.decode_buckets), prefill_chunks=list(e.preset.prefill_chunks),
        policy=e.policy.name, versions=self.versions)

  async def stats(self) -> pb.Stats:
    st, policy = await asyncio.wrap_future(
        self.loop.call(lambda e: (e.stats(), (e.policy.name, getattr(e.policy, "width", "")))))
    return pb.Stats(
        partition=st["partition"], running=st["running"], waiting=st["waiting"],
        paused=st["paused"], kv_usage=st["kv_usage"], steps=st["steps"],
        switches=st["switches"], switches_by_reason_strategy=st["switches_by_reason_strategy"],
        seconds_per_partition=st["seconds_per_partition"], draining=self.draining,
        policy=policy[0], pinned_partition=str(policy[1]),
        pending_partition=st["pending_partition"] or "", pending_reason=st["pending_reason"] or "",
        pending_s=st["pending_s"], superseded_drains=st["superseded_drains"],
        prefix_cache=st["prefix_cache"],
        prefix_cache_queried_tokens=st["prefix_cache_queried_tokens"],
        prefix_cache_hit_tokens=st["prefix_cache_hit_tokens"],
        prefix_cache_hit_rate=st["prefix_cache_hit_rate"],
        prefix_cache_pages=st["prefix_cache_pages"])


def versions() -> dict:
  import importlib.metadata as md

  out = {}
  for name in ("flying-jax", "jax", "jaxlib", "grpcio"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


async def serve_forever(server: Server, ready=None):
  """Start, print where it listens, and run until SIGTERM / SIGINT, which drain and stop."""
  await server.start()
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  if ready is not None:
    ready(server)
  await stop.wait()
  log.info("signal received: draining for up to %.0f s", server.config.drain_grace_s)
  await server.shutdown()


class ServerThread:
  """A server on its own event loop in a background thread (tests, notebooks)."""

  def __init__(self, server: Server):
    self.server = server
    self._loop = asyncio.new_event_loop()
    started = threading.Event()
    self._error: BaseException | None = None

    def run():
      asyncio.set_event_loop(self._loop)
      try:
        self._loop.run_until_complete(server.start())
      except BaseException as e:          # reported to the constructor's caller
        self._error = e
        started.set()
        return
      started.set()
      self._loop.run_forever()

    self._thread = threading.Thread(target=run, name="flying-jax-grpc", daemon=True)
    self._thread.start()
    started.wait()
    if self._error is not None:
      raise self._error

  @property
  def target(self) -> str:
    return f"{self.server.config.host}:{self.server.port}"

  @property
  def http_target(self) -> str | None:
    """HOST:PORT of the HTTP API (None without one); its OpenAI base URL is
    `http://{http_target}/v1`."""
    cfg = self.server.config
    port = self.server.http_port
    return None if port is None else f"{cfg.http_host or cfg.host}:{port}"

  def run(self, coro):
    """Run a coroutine on the server's loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

  def stop(self, grace_s: float = 5.0):
    self.run(self.server.shutdown(grace_s))
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(10)


__all__ = ["ServeConfig", "Server", "ServerThread", "serve_forever", "versions"]
