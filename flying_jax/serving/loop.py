"""The engine on its own thread: the only thread that touches it.

The gRPC side never calls the engine: it posts commands (submit, abort, any function of the
engine) to a queue and receives results through futures, and each request's stream items through
a sink it gives at submission (an asyncio queue fed with `call_soon_threadsafe`). The thread runs
commands between steps, steps while there is work, and sleeps on the queue when there is none.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

from flying_jax.engine.engine import Engine, RequestRejected
from flying_jax.engine.sequence import TokenLogprob
from flying_jax.engine.stepping import SeqEvent
from flying_jax.sampling import SamplingParams

log = logging.getLogger("flying_jax")


class QueueFull(RuntimeError):
  """The bounded waiting queue is full (RESOURCE_EXHAUSTED)."""


class Draining(RuntimeError):
  """The server is draining and admits nothing new (FAILED_PRECONDITION)."""


@dataclasses.dataclass(frozen=True)
class Submission:
  request_id: str
  prompt_ids: list[int]
  params: SamplingParams
  priority: int = 0


@dataclasses.dataclass(frozen=True)
class StreamItem:
  """What one step produced for one sample of a request."""
  index: int
  token_ids: list[int]
  text: str
  logprobs: list[TokenLogprob]
  finish_reason: str | None
  stop_reason: int | str | None
  prompt_tokens: int
  completion_tokens: int
  queue_s: float | None
  ttft_s: float | None
  elapsed_s: float
  error: str | None = None
  cached_tokens: int = 0    # prompt tokens whose KV came from the prefix cache


DONE = object()          # the sink's last item: every sample of the request has finished


@dataclasses.dataclass
class _Stream:
  sink: Callable
  remaining: int         # samples not finished yet


class EngineLoop:
  def __init__(self, engine: Engine, max_waiting: int = 256, metrics=None):
    self.engine = engine
    self.max_waiting = max_waiting
    self.metrics = metrics
    self.draining = False
    self._commands: queue.SimpleQueue = queue.SimpleQueue()
    self._streams: dict[str, _Stream] = {}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="flying-jax-engine", daemon=True)

  # the asyncio side ----------------------------------------------------------------------------
  def start(self):
    self._thread.start()

  def stop(self, timeout: float = 10.0):
    self._stop.set()
    self._commands.put(None)
    self._thread.join(timeout)

  def call(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
    """Run `fn(engine)` on the engine thread between steps."""
    fut: concurrent.futures.Future = concurrent.futures.Future()
    self._commands.put((fn, fut))
    return fut

  def submit(self, sub: Submission, sink: Callable) -> concurrent.futures.Future:
    """Queue a request; the future fails with RequestRejected, QueueFull or Draining."""
    return self.call(lambda engine: self._admit(engine, sub, sink))

  def abort(self, request_id: str):
    """Cancel a request (client gone, deadline passed); its pages are freed before the next step."""
    self.call(lambda engine: self._forget(engine, request_id, abort=True))

  def idle(self) -> bool:
    return not self._streams

  # the engine thread ---------------------------------------------------------------------------
  def _admit(self, engine: Engine, sub: Submission, sink):
    if self.draining:
      raise Draining("the server is draining: it admits no new requests")
    n = sub.params.n
    if n > self.max_waiting:
      raise RequestRejected(f"n={n} samples is more than this server queues "
                            f"({self.max_waiting} sequences)")
    if len(engine.scheduler.waiting) + n > self.max_waiting:
      raise QueueFull(f"the waiting queue is full ({self.max_waiting} sequences); retry later")
    seqs = engine.add_request(sub.request_id, sub.prompt_ids, sub.params, sub.priority)
    self._streams[sub.request_id] = _Stream(sink, len(seqs))
    if self.metrics is not None:
      self.metrics.on_submit(sub)

  def _forget(self, engine: Engine, request_id: str, abort: bool):
    if self._streams.pop(request_id, None) is None:
      return
    if abort:
      running = [s for s in engine.request(request_id) if not s.finished]
      engine.abort(request_id)
      if self.metrics is not None:
        self.metrics.on_abort(running)
    engine.release(request_id)

  def _run(self):
    engine = self.engine
    while not self._stop.is_set():
      busy = engine.has_unfinished()
      self._run_commands(block=not busy)
      if self._stop.is_set():
        break
      if not engine.has_unfinished():
        continue
      try:
        events = engine.step()
      except Exception as e:                   # a bug: fail what is in flight, keep serving
        log.exception("engine step failed")
        self._fail_all(engine, f"{type(e).__name__}: {e}")
        continue
      if not events and not engine.scheduler.has_work() and len(engine.paused):
        self._resume_paused(engine)
      self._deliver(engine, events)
      self._refresh()

  def _run_commands(self, block: bool):
    """Run the queued commands. The gauges show each command's effect (an abort, a pin, a drain)
    before its caller hears back, even when no step follows."""
    try:
      item = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
    except queue.Empty:
      return
    while item is not None:
      fn, fut = item
      if fut.set_running_or_notify_cancel():
        try:
          result = fn(self.engine)
        except BaseException as e:             # handed to the caller, never raised here
          self._refresh()
          fut.set_exception(e)
        else:
          self._refresh()
          fut.set_result(result)
      try:
        item = self._commands.get_nowait()
      except queue.Empty:
        return

  def _refresh(self):
    if self.metrics is not None:
      self.metrics.refresh(self.engine)

  def _fail_all(self, engine: Engine, message: str):
    for rid, stream in list(self._streams.items()):
      stream.sink(StreamItem(0, [], "", [], "error", None, 0, 0, None, None, 0.0, message))
      try:
        self._forget(engine, rid, abort=True)
      except Exception:                        # the engine is in a bad state: say so, go on
        log.exception("could not abort %s", rid)

  def _resume_paused(self, engine: Engine):
    """Only paused sequences are left and nothing will bring their layout back: recompute them
    in the partition in force (no switch: a pending drain stays pending)."""
    engine.recompute_paused()

  def _deliver(self, engine: Engine, events):
    now = time.monotonic()
    for ev in events:
      seq = ev.seq
      stream = self._streams.get(seq.request_id)
      if stream is None:
        continue
      stream.sink(_item(ev, now))
      if self.metrics is not None:
        if ev.new_ids:
          self.metrics.on_token(seq, now)
        if ev.finished:
          self.metrics.on_finish(seq)
      if ev.finished:
        stream.remaining -= 1
        if stream.remaining == 0:
          stream.sink(DONE)
          self._forget(engine, seq.request_id, abort=False)


def _item(ev: SeqEvent, now: float) -> StreamItem:
  """The stream item of one event, as of that event (one delivery may hold several events of a
  sequence: its finish reason and count belong to the last of them only)."""
  seq, new_ids, n = ev.seq, ev.new_ids, ev.outputs
  lps = seq.logprobs[n - len(new_ids):n] if seq.params.logprobs is not None else []
  queue_s = None if seq.scheduled_time is None else seq.scheduled_time - seq.arrival_time
  ttft = None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time
  return StreamItem(seq.index, list(new_ids), ev.text_delta, list(lps),
                    seq.finish_reason if ev.finished else None,
                    seq.stop_reason if ev.finished else None, len(seq.prompt_ids), n, queue_s,
                    ttft, now - seq.arrival_time, seq.error if ev.finished else None,
                    seq.cached_tokens)


__all__ = ["DONE", "Draining", "EngineLoop", "QueueFull", "RequestRejected", "StreamItem",
           "Submission"]
