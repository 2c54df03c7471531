"""Keeping the followers' dispatches in step with the leader's.

The leader's executor hands every launch to `Channel.publish` before dispatching it: the span,
the step shape and the packed step rows (the very array the leader puts on its devices: sampling
fields, tokens, positions, KV slots, page tables), the launch it follows (whose sampled ids feed
its decode slots) and the launches collected since the last message (the follower frees their
outputs); KV migrations go the same way (their placements and page numbers). A follower
(`follow`) replays them in order on its own copy of the engine's programs and resident arrays,
so every process dispatches the same programs with the same arguments, which is what a
multi-controller program needs.

The channel is JAX's distributed key-value store (the coordinator's, on process 0): one key per
message and follower, written by the leader and deleted by the follower that read it. A
collective (`multihost_utils.broadcast_one_to_all`) would cost a device program and a
rendezvous of every device per message and needs equal shapes on both sides; the store costs
one small RPC (about 1 ms on loopback) and carries any message.
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
import time

log = logging.getLogger(__name__)

PREFIX = "flying-jax/lockstep"


def _client():
  from jax._src import distributed

  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("jax.distributed is not initialized (cluster.join first)")
  return client


class Channel:
  """Ordered messages from process 0 to every other process. The leader's `publish` pickles a
  message and queues it; a sender thread writes the queue to the store in order, so the leader
  packs and dispatches its next step while a message travels (the followers' collectives wait
  for them, not the leader's host)."""

  def __init__(self, process_id: int, processes: int, client=None):
    self.process_id, self.processes = process_id, processes
    self.client = client if client is not None else _client()
    self.sent = self.received = 0
    self.publish_s = 0.0                      # the leader's host time publishing (pickle, queue)
    self.send_s = 0.0                         # the sender thread's time writing to the store
    self._queue: queue.SimpleQueue | None = None
    self._failed: BaseException | None = None

  def publish(self, message):
    t0 = time.perf_counter()
    if self._failed is not None:
      raise RuntimeError(f"the lockstep channel failed: {self._failed}") from self._failed
    if self._queue is None:
      self._queue = queue.SimpleQueue()
      threading.Thread(target=self._send, name="flying-jax-lockstep", daemon=True).start()
    self._queue.put((self.sent, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)))
    self.sent += 1
    self.publish_s += time.perf_counter() - t0

  def flush(self, timeout_s: float = 60.0):
    """Wait until every message published so far is in the store."""
    done = threading.Event()
    if self._queue is None:
      return
    self._queue.put((None, done))
    if not done.wait(timeout_s):
      raise TimeoutError(f"the lockstep channel did not send its messages in {timeout_s} s")

  def _send(self):
    while True:
      n, data = self._queue.get()
      if n is None:
        data.set()
        continue
      t0 = time.perf_counter()
      try:
        for p in range(1, self.processes):
          self.client.key_value_set_bytes(f"{PREFIX}/{p}/{n}", data)
      except BaseException as e:               # the coordinator is gone: the next publish says so
        self._failed = e
        log.error("lockstep channel: %s", e)
      self.send_s += time.perf_counter() - t0

  def receive(self, timeout_s: float):
    """The next message, or None when none came within `timeout_s`."""
    key = f"{PREFIX}/{self.process_id}/{self.received}"
    try:
      data = self.client.blocking_key_value_get_bytes(key, int(timeout_s * 1000))
    except Exception as e:                       # a deadline: nothing yet
      if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
        return None
      raise
    self.client.key_value_delete(key)
    self.received += 1
    return pickle.loads(data)


class _MirroredMigrator:
  """The leader's migrator: every move is published before it runs."""

  def __init__(self, inner, publish):
    self.inner, self.publish = inner, publish

  def move(self, pools, arch, *args, **kwargs):
    self.publish(("migrate", args, kwargs))
    return self.inner.move(pools, arch, *args, **kwargs)

  def __len__(self):
    return len(self.inner)


def lead(engine, channel: Channel, on_failure=None):
  """Make `engine` (process 0's) publish every dispatch to the followers. `on_failure(message)`
  is called when a step fails to launch or to collect (a process died, a collective broke: the
  processes can no longer go on in step); the engine still fails that step's sequences."""
  ex = engine.executor
  ex.gather_everywhere()
  ex.mirror = channel.publish
  if engine.migrator is not None:
    engine.migrator = _MirroredMigrator(engine.migrator, channel.publish)
  if on_failure is not None:
    for name in ("launch", "collect"):
      setattr(ex, name, _reporting(getattr(ex, name), on_failure))


def _reporting(fn, on_failure):
  def run(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except Exception as e:
      on_failure(f"{type(e).__name__}: {e}")
      raise
  return run


def report(channel: Channel, engine) -> str:
  """What keeping the followers in step cost the leader, against its steps' time."""
  steps = list(engine.timings)
  total = sum(t.total_s for t in steps)
  n = max(1, channel.sent)
  share = f", {100 * channel.publish_s / total:.2f}% of the {len(steps)} steps timed" if total \
      else ""
  return (f"lockstep: {channel.sent} messages, {1e3 * channel.publish_s / n:.2f} ms each on the "
          f"leader's step ({channel.publish_s:.2f} s in all{share}), "
          f"{1e3 * channel.send_s / n:.2f} ms each to reach the store (beside the steps)")


def stop(channel: Channel, code: int = 0):
  """Tell the followers to stop (they exit with `code`)."""
  channel.publish(("stop", code))
  channel.flush()


def follow(engine, channel: Channel, poll_s: float = 1.0) -> tuple[str, object]:
  """Replay the leader's dispatches on this process's part of `engine` until it stops ("stop",
  exit code) or hands over a result ("result", what `LLM.generate` returned there)."""
  ex = engine.executor
  ex.gather_everywhere()
  setups = engine.span_setups
  live: dict[int, list] = {}
  while True:
    msg = channel.receive(poll_s)
    if msg is None:
      continue
    kind = msg[0]
    if kind == "launch":
      _, number, built, prev, collected = msg
      for done in collected:                     # the leader has read them: free them here
        live.pop(done, None)
      outs = []
      for k, (span, shape, packed) in enumerate(built):
        fed = live[prev][k][0] if prev else None
        out, _ = ex.run_span(setups[span], shape, packed, fed)
        outs.append(out)
      live[number] = outs
    elif kind == "migrate":
      engine.migrator.move(engine.device_pools, engine.card.arch, *msg[1], **msg[2])
    elif kind in ("stop", "result"):
      return kind, msg[1]
    else:
      raise RuntimeError(f"unknown lockstep message {kind!r}")
