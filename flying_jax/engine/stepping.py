"""A step's life on the host: launched (the sequences advance at once), collected (the sampled ids
become tokens, text and finishes), or failed.

With overlap (`EngineConfig.overlap`) the engine launches step n+1 before it collects step n: a
decoding sequence then has a token still on the device (`Sequence.pending`), which step n+1 reads
there (`StepMeta.feed`). The engine collects first when the next step needs that token on the
host (`may_follow`). A sequence that finishes (a stop id or string, an abort) while a step that
includes it is in flight gets nothing from that step; its pages, freed at once, may be written by
that step, which runs on the device before any step that could give them to another sequence.
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
  seq: Sequence
  new_ids: list[int]
  text_delta: str
  finished: bool


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


def may_follow(work: list[GroupWork]) -> bool:
  """Whether `work` can be packed before the step in flight is collected: every token it reads
  is known on the host but decode slots' own last tokens, and no row's sampling reads a history
  that lacks one (penalties)."""
  for w in work:
    if any(p.seq.pending for p in w.prefills):
      return False
    if any(s.pending and s.params.has_penalties for s in w.decode):
      return False
  return True


def unfinished(w: GroupWork) -> GroupWork:
  """`w` without the sequences that finished since it was scheduled."""
  return GroupWork([s for s in w.decode if not s.finished],
                   [p for p in w.prefills if not p.seq.finished])


def launch(engine, work: list[GroupWork], prev, started: float):
  """Dispatch `work` after `prev` (a (launched, work) still in flight, or None); its sequences
  advance at once, so that the host schedules the next step from where this one leaves them.
  Returns (launched, work), or None when the dispatch failed (its sequences fail)."""
  try:
    launched = engine.executor.launch(engine._spans, work, engine.outputs.banned_ids,
                                      prev[0] if prev is not None else None)
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
  return launched, work


def collect(engine, launched, work: list[GroupWork]) -> list[SeqEvent]:
  """Read a launched step's sampled ids and hand them to its sequences (those that finished
  meanwhile drop theirs)."""
  t0 = time.perf_counter()
  try:
    result = engine.executor.collect(launched)
  except Exception as e:
    log.exception("step failed")
    return fail(engine, work, f"{type(e).__name__}: {e}")
  finally:
    engine.waited_s += time.perf_counter() - t0
  events = []
  tokens = result.tokens.tolist()
  for g, w in enumerate(work):
    row_tokens, cap = tokens[g], engine.scheduler.groups[g].capacity
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
      engine.scheduler.remove(seq)
      engine.outputs.finish(seq, "error")
      events.append(SeqEvent(seq, [], "", True))
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
  return SeqEvent(seq, [token], delta, finished)
