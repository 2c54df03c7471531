"""Helpers shared by the test modules."""

import collections
import contextlib

import numpy as np


@contextlib.contextmanager
def captured_logits(engine):
  """The float32 logits row of every sampled token, per seq_id, in sampling order."""
  got = collections.defaultdict(list)
  original = engine.executor.run

  def run_and_keep(spans, work, banned_for):
    res = original(spans, work, banned_for)
    for g, w in enumerate(work):
      logits = res.logits_of(g)
      for i, seq in enumerate(w.decode):
        got[seq.seq_id].append(logits[res.row(g, i, prefill=False)])
      for j, pre in enumerate(w.prefills):
        if pre.samples:
          got[pre.seq.seq_id].append(logits[res.row(g, j, prefill=True)])
    return res

  engine.executor.run = run_and_keep
  try:
    yield got
  finally:
    del engine.executor.run
