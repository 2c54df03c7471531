"""What the gRPC test modules share: prompts, offline references, leak and status checks."""

import contextlib
import time
import urllib.request

import grpc
import numpy as np
import pytest

from flying_jax.sampling import SamplingParams
from flying_jax.serving.server import ServeConfig, Server, ServerThread


def prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(f"w{int(x)}" for x in rng.integers(0, 50, size=int(k)))
          for k in rng.integers(2, 12, size=n)]


def offline(engine, texts, max_tokens=8, **kw):
  """Greedy ids and text of each prompt, the engine driven directly (before a server owns it)."""
  tok = engine.outputs.tokenizer
  params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)
  for i, t in enumerate(texts):
    engine.add_request(f"ref-{i}", tok.encode(t), params)
  while engine.has_unfinished():
    engine.step()
  out = []
  for i in range(len(texts)):
    (seq,) = engine.request(f"ref-{i}")
    out.append((list(seq.output_ids), seq.text))
    engine.release(f"ref-{i}")
  return out


@contextlib.contextmanager
def running_server(engine, admin_token: str, versions: dict | None = None, **config):
  """A server for `engine` on a free loopback port, with metrics, stopped at the end."""
  settings = dict(port=0, admin_token=admin_token, max_prompt_tokens=200, metrics_port=0,
                  drain_grace_s=5.0, max_message_bytes=64 * 1024)
  th = ServerThread(Server(engine, engine.outputs.tokenizer, ServeConfig(**{**settings, **config}),
                           versions))
  try:
    yield th
  finally:
    th.stop()


def no_leaks(server, timeout_s=10.0) -> bool:
  """Whether the engine is idle with every KV page free, within `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if server.server.loop.call(lambda e: e.no_leaks()).result():
      return True
    time.sleep(0.05)
  return False


def code_of(call) -> tuple[grpc.StatusCode, str]:
  with pytest.raises(grpc.RpcError) as err:
    call()
  return err.value.code(), err.value.details()


def scrape(server) -> dict[str, float]:
  """The server's /metrics as {'name{labels}': value}."""
  body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics",
                                timeout=10).read().decode()
  out = {}
  for line in body.splitlines():
    if line and not line.startswith("#"):
      key, value = line.rsplit(" ", 1)
      out[key] = float(value)
  return out


def gauge(metrics: dict, name: str, model: str = "tiny", **labels) -> float:
  """The sample `name` with exactly these labels (0 when absent)."""
  want = {f'model_name="{model}"'} | {f'{k}="{v}"' for k, v in labels.items()}
  for key, value in metrics.items():
    base, _, inner = key.partition("{")
    if base == name and set(inner.rstrip("}").split(",")) == want:
      return value
  return 0.0
