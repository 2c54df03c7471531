"""A step's life on the host: launched (the sequences advance at once), collected (the sampled ids
become tokens, text and finishes), or failed; and the spans of a partition, each stepping on its
own.

Every span of the partition (all devices in a uniform one; a mixed one has several) has its own
queue of launched steps: a span launches its next step as soon as its queue has room, whatever the
other spans are doing, so a span of short decode steps runs several of them while another runs
one long prefill. One controller (the engine's thread) owns the dispatch order: each
`Engine.step()` collects what is done (`collect_ready`), launches every span with room
(`launch_spans`), and when it collected nothing waits for the first span to finish
(`collect_first`: a readiness poll, never a thread per span).

With overlap (`EngineConfig.overlap`) a span's queue holds two steps: the engine launches step n+1
before it collects step n, so a decoding sequence has a token still on the device
(`Sequence.pending`), which step n+1 reads there (`StepMeta.feed`). A span whose next step needs
that token on the host (`may_follow`) waits for its collect. A sequence that finishes (a stop id
or string, an abort) while a step that includes it is in flight gets nothing from that step; its
pages, freed at once, may be written by that step, which runs on the device before any step that
could give them to another sequence (only the span's own steps use its devices' pages).

Structured output: a constrained row's token mask depends on the token before it. When that
token is still on the device, step n+1's step program is launched as usual (its tokens fed on
the device) and its sampling program waits (`InFlight.then`): collecting step n advances the
matchers, then the masks are computed and the sampling dispatched while the device runs step
n+1's forward (`EngineConfig.defer_masks`; off: such a step waits for the collect, as
`may_follow` makes penalties wait).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from flying_jax.engine.scheduler import GroupWork
from flying_jax.engine.sequence import Sequence

log = logging.getLogger("flying_jax")


@dataclasses.dataclass(slots=True)
class SeqEvent:
  """What one collected step did to one sequence. A call may hand out several events of a
  sequence (spans' queues hold two steps, a switch collects first): read its state as of the
  event from here, not from the sequence."""
  seq: Sequence
  new_ids: list[int]
  text_delta: str
  finished: bool
  outputs: int = 0                    # the sequence's output tokens after this event


@dataclasses.dataclass
class StepTiming:
  shape: object
  host_s: float          # host work: scheduling, packing, token bookkeeping (not dispatch, not
  #                        waiting for sampled ids)
  dispatch_s: float      # enqueueing the compiled programs
  total_s: float         # the engine's step call: with overlap, until the previous step's ids
  #                        are on the host and this one is running
  tokens: int            # tokens processed (prefill + decode, real ones)
  decoded: int           # decode slots used


@dataclasses.dataclass
class InFlight:
  """A span's step launched and not collected yet."""
  launched: object                    # the executor's handle (`runtime.executor.Launched`)
  work: list[GroupWork]               # one per group of the span
  first: int                          # the scheduler's index of the span's first group
  at: float = 0.0                     # launched at (the engine's clock)
  then: InFlight | None = None        # the next step, whose sampling waits for this collect


def may_follow(work: list[GroupWork], defer_masks: bool = True) -> bool:
  """Whether `work` can be packed before the step in flight is collected: every token it reads
  is known on the host but decode slots' own last tokens, and no row's sampling reads a history
  that lacks one (penalties), nor a token mask that needs one unless masks may come later
  (`defer_masks`)."""
  for w in work:
    if any(p.seq.pending for p in w.prefills):
      return False
    if any(s.pending and (s.params.has_penalties or (
        not defer_masks and s.params.structured_outputs is not None)) for s in w.decode):
      return False
  return True


def _structured(engine, work: list[GroupWork]) -> dict:
  """The executor's arguments for a step's token masks: none when no row is constrained; a
  deferred sampling when a constrained row's previous token is still on the device."""
  rows = [s for w in work for s in w.decode] + [p.seq for w in work for p in w.prefills
                                                 if p.samples]
  held = [s.pending for s in rows if s.params.structured_outputs is not None and not s.finished]
  if not held:
    return {}
  return {"mask_for": engine.outputs.fill_masks, "defer": any(held)}


def launch_spans(engine, started: float, only=None) -> tuple[list[InFlight], list[int]]:
  """Schedule and launch the next step of every span (or those in `only`) whose queue has room;
  returns the steps launched and the spans whose next step must wait for a collect
  (`may_follow`)."""
  depth = 2 if engine.overlap else 1
  launched, blocked = [], []
  for k in (range(len(engine._spans)) if only is None else only):
    queue = engine._inflight[k]
    if len(queue) >= depth:
      continue
    groups = engine._span_groups[k]
    work = engine.scheduler.schedule(groups)
    if all(w.empty for w in work):
      continue
    if queue and not may_follow(work, engine.config.defer_masks):
      blocked.append(k)                 # scheduled again once its step in flight is collected
      continue
    flight = launch(engine, k, work, queue[-1] if queue else None, started)
    if flight is not None:
      queue.append(flight)
      launched.append(flight)
  return launched, blocked


def collect_ready(engine, keep=frozenset()) -> list[SeqEvent]:
  """Collect, oldest first, every span's steps that are done (no waiting) but those in `keep`
  (ids of steps launched in this call)."""
  events = []
  for queue in engine._inflight:
    while queue and id(queue[0]) not in keep and engine.executor.ready(queue[0].launched):
      events += collect(engine, queue.popleft())
  return events


def collect_first(engine, keep=frozenset()) -> list[SeqEvent]:
  """Wait for the first span whose oldest step (not in `keep`) finishes, and collect that step;
  nothing when every step in flight is in `keep`."""
  heads = [(k, q[0]) for k, q in enumerate(engine._inflight) if q and id(q[0]) not in keep]
  if not heads:
    return []
  t0 = time.perf_counter()
  i = engine.executor.wait_any([f.launched for _, f in heads]) if len(heads) > 1 else 0
  engine.waited_s += time.perf_counter() - t0
  return collect(engine, engine._inflight[heads[i][0]].popleft())


def launch(engine, k: int, work: list[GroupWork], prev: InFlight | None,
           started: float) -> InFlight | None:
  """Dispatch span k's `work` after `prev` (its step still in flight, or None); its sequences
  advance at once, so that the host schedules the next step from where this one leaves them.
  Returns None when the dispatch failed (its sequences fail)."""
  try:
    launched = engine.executor.launch([engine._spans[k]], work, engine.outputs.banned_ids,
                                      prev.launched if prev is not None else None,
                                      **_structured(engine, work))
  except Exception as e:  # a failed step fails its sequences, frees their pages, and is logged
    log.exception("step failed")
    engine._ready += fail(engine, work, f"{type(e).__name__}: {e}")
    return None
  for g, w in enumerate(work):
    shape = launched.group_shapes[g]
    for i, seq in enumerate(w.decode):
      seq.computed += 1
      seq.pending += 1
      seq.feed_row = shape.sampled_row(i, prefill=False)
    for j, pre in enumerate(w.prefills):
      seq = pre.seq
      seq.computed += pre.length
      if seq.scheduled_time is None:
        seq.scheduled_time = started             # the clock of arrival_time
      if pre.samples:
        seq.pending += 1
        seq.feed_row = shape.sampled_row(j, prefill=True)
  engine.steps += 1
  flight = InFlight(launched, work, engine._span_groups[k].start, engine.clock())
  if getattr(launched, "staged", None) is not None:
    if prev is None:                   # (never: a pending token is in the span's step in flight)
      engine.executor.sample(launched)
    else:
      prev.then = flight               # its pending tokens are in `prev` (the queue's only step)
  return flight


def collect(engine, flight: InFlight) -> list[SeqEvent]:
  """Read a launched step's sampled ids and hand them to its sequences (those that finished
  meanwhile drop theirs)."""
  try:
    return _collect(engine, flight)
  finally:
    if flight.then is not None:         # the matchers have advanced: its masks can be made
      engine.executor.sample(flight.then.launched)


def _collect(engine, flight: InFlight) -> list[SeqEvent]:
  launched, work = flight.launched, flight.work
  engine.collected += 1
  t0 = time.perf_counter()
  try:
    result = engine.executor.collect(launched)
  except Exception as e:
    log.exception("step failed")
    return fail(engine, work, f"{type(e).__name__}: {e}")
  finally:
    engine.waited_s += time.perf_counter() - t0
  engine.demand.collected(flight.first, engine.scheduler.groups[flight.first].width, work,
                          flight.at, engine.clock())
  events = []
  tokens = result.tokens.tolist()
  for g, w in enumerate(work):
    row_tokens, cap = tokens[g], engine.scheduler.groups[flight.first + g].capacity
    for i, seq in enumerate(w.decode):
      seq.pending -= 1
      if not seq.finished:
        events.append(_accept(engine, seq, row_tokens[i], result, g, i, cap))
    for j, pre in enumerate(w.prefills):
      seq = pre.seq
      if pre.samples:
        seq.pending -= 1
        if not seq.finished:
          row = result.row(g, j, prefill=True)
          events.append(_accept(engine, seq, row_tokens[row], result, g, row, cap))
  return events


def fail(engine, work: list[GroupWork], message: str) -> list[SeqEvent]:
  """Fail the unfinished sequences of `work`: error status, pages freed."""
  events = []
  for w in work:
    for seq in w.decode + [p.seq for p in w.prefills]:
      if seq.finished:
        continue
      seq.error = message
      engine.scheduler.remove(seq, discard=True)    # its pages' bytes are not to be trusted
      engine.outputs.finish(seq, "error")
      events.append(SeqEvent(seq, [], "", True, len(seq.output_ids)))
  return events


def _accept(engine, seq: Sequence, token: int, result, g: int, row: int,
            capacity: int) -> SeqEvent:
  lp = None
  if result.logprob is not None and seq.params.logprobs is not None:
    k = seq.params.logprobs
    lp = (float(result.logprob[g, row]),
          list(zip(result.top_ids[g, row, :k].tolist(), result.top_logprobs[g, row, :k].tolist())))
  delta, finished = engine.outputs.append(seq, token, lp, capacity)
  if finished:
    engine.scheduler.remove(seq)
  return SeqEvent(seq, [token], delta, finished, len(seq.output_ids))
