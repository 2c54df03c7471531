"""Helpers shared by the test modules."""

import collections
import contextlib

import numpy as np


@contextlib.contextmanager
def captured_logits(engine):
  """The float32 logits row of every sampled token, per seq_id, in sampling order (a step
  collected after its sequence finished, by overlap, adds none)."""
  got = collections.defaultdict(list)
  original = engine.executor.collect

  def collect_and_keep(launched):
    res = original(launched)
    for g, w in enumerate(launched.work):
      logits = res.logits_of(g)
      for i, seq in enumerate(w.decode):
        if not seq.finished:
          got[seq.seq_id].append(logits[res.row(g, i, prefill=False)])
      for j, pre in enumerate(w.prefills):
        if pre.samples and not pre.seq.finished:
          got[pre.seq.seq_id].append(logits[res.row(g, j, prefill=True)])
    return res

  engine.executor.collect = collect_and_keep
  try:
    yield got
  finally:
    del engine.executor.collect


# a partition switch at these steps of a run: (width, strategy)
SWITCH_PLAN = {6: (2, "migrate"), 14: (1, "migrate"), 22: (2, "pause"), 26: (1, "pause"),
               30: (2, "recompute"), 40: (1, "migrate")}


def switched_run(engine, run, reqs):
  """`run(engine, reqs, on_step)` with the switches of `SWITCH_PLAN` on its steps; checks every
  strategy happened; returns (what run returned first, the switch records)."""
  records = []
  got, _ = run(engine, reqs, lambda k: records.append(
      engine.switch(*SWITCH_PLAN[k], reason="test")) if k in SWITCH_PLAN else None)
  assert sum(r.migrated for r in records) >= 3 and sum(r.paused for r in records) >= 1
  assert any(r.recomputed for r in records)
  return got, records


def long_requests(seed=0, vocab=256):
  """Three greedy requests whose generations run several windows of a tiny windowed model."""
  from flying_jax.sampling import SamplingParams

  rng = np.random.default_rng(seed)
  return [(rng.integers(0, vocab, size=n).tolist(),
           SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True))
          for n, m in ((37, 40), (6, 56), (21, 48))]


def serve_checked(engine, reqs, tag: str, check, on_step=None):
  """Serve `reqs` to the end, calling `check(seqs, was_decoding)` after every step (was_decoding:
  seq_id -> whether it decoded in that step) and `on_step(k)` after step k; returns the
  sequences (released from the engine)."""
  import itertools

  from flying_jax.engine.sequence import Status

  seqs = [engine.add_request(f"{tag}-{i}", p, sp)[0] for i, (p, sp) in enumerate(reqs)]
  for k in itertools.count(1):
    assert k < 2000, "the workload did not finish"
    if not engine.has_unfinished():
      break
    was_decoding = {s.seq_id: s.status is Status.RUNNING and s.is_decoding for s in seqs}
    engine.step()
    check(seqs, was_decoding)
    if on_step is not None:
      on_step(k)
  for i in range(len(reqs)):
    engine.release(f"{tag}-{i}")
  return seqs


CAP = {1: 192, 2: 384, 4: 768, 8: 1536}      # longest sequence a group of each width holds


def obs(**kw):
  """A policy's `Observation` of a quiet engine on widths 1-8, with `kw` changed (a priority
  request in it has not had its first token unless `max_priority_unstarted` says otherwise)."""
  from flying_jax.engine.policies import Observation

  base = dict(width=1, widths=(1, 2, 4, 8), capacity=CAP, waiting=0, running=0, paused=0,
              paused_widths=(), waiting_max_length=0, max_priority=0, oldest_wait_s=0.0,
              kv_usage=0.0, step=0)
  base.update(kw)
  base.setdefault("max_priority_unstarted", base["max_priority"])
  return Observation(**base)
