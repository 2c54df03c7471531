"""A hardware preset's cost model against step times measured on that hardware.

A preset may carry `[[measured]]` points: one chip's step time for a model at a decode batch (or
one prefill chunk) at a context, where and how it was measured. `flying-jax sim validate
--hardware NAME` prints each point beside what the preset's model predicts for the same work
(the simulator's own `span_work` and the preset's roofline), and the achievable shares (`mbu`,
`mfu`) and host overhead that fit the points best: with compute and memory time added, a step's
time is linear in the overhead and 1 / mfu (`mbu` comes from a measured stream rate), so they are
a non-negative least-squares fit on relative error.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np

from flying_jax.model.batch import StepShape
from flying_jax.engine.scheduler import GroupWork, PrefillRow
from flying_jax.sim.cost import ModelCosts, Roofline, span_work

TOLERANCE = 0.10           # the preset's prediction against each point it was fitted to


@dataclasses.dataclass(frozen=True)
class Point:
  model: str
  ms: float                 # measured step time
  batch: int = 0            # decode sequences (0: a prefill step)
  context: int = 0          # tokens each decode sequence attends to / the chunk's start
  chunk: int = 0            # prefill tokens of the step
  fit: bool = True          # one of the points the preset's shares are set from
  source: str = ""

  @property
  def label(self) -> str:
    return f"decode b{self.batch}" if self.batch else f"prefill {self.chunk}"


def points(hw) -> list[Point]:
  return [Point(**p) for p in hw.measured]


def work_of(card, p: Point, dtype_bytes: int):
  """The simulator's work for point `p` on one chip."""
  from flying_jax.engine.sequence import Sequence
  from flying_jax.sampling import SamplingParams

  a = card.arch
  costs = ModelCosts.of(a, dtype_bytes)
  ws = types.SimpleNamespace(width=1, plan=types.SimpleNamespace(q_per_device=a.n_heads,
                                                                 kv_per_device=a.n_kv_heads))
  if p.batch:
    seqs = [types.SimpleNamespace(computed=p.context) for _ in range(p.batch)]
    work, shape = GroupWork(decode=seqs), StepShape(p.batch, 0, 1)
  else:
    seq = Sequence(0, "ref", 0, [1] * (p.context + p.chunk), SamplingParams(max_tokens=1), 0,
                   frozenset())
    work = GroupWork(decode=[], prefills=[PrefillRow(seq, p.context, p.chunk)])
    shape = StepShape(0, p.chunk, 1)
  return span_work(costs, ws, [work], shape)


def predict(hw, card, p: Point, dtype_bytes: int = 2) -> float:
  """The preset's time for `p`, in ms."""
  return 1e3 * Roofline.of(hw, card.arch.n_layers).step_time([work_of(card, p, dtype_bytes)])


def fit_shares(hw, cards: dict, pts: list[Point], dtype_bytes: int = 2) -> dict:
  """`mfu` and `step_overhead_ms` that fit `pts` (those marked `fit`) best, with the preset's own
  `mbu` (one chip's weights are read once whatever the batch, so the points cannot tell memory
  time from a fixed overhead: `mbu` comes from a measured stream rate). Compute and memory time
  add up (`overlap = false`); under `overlap` their max is not linear and nothing is fitted."""
  from scipy.optimize import nnls

  use = [p for p in pts if p.fit]
  if hw.overlap or not use:
    return {}
  rows, rest = [], []
  for p in use:
    card = cards[p.model]
    peak = Roofline.of(dataclasses.replace(hw, mfu=1.0), card.arch.n_layers)   # mfu left out
    w = work_of(card, p, dtype_bytes)
    rows.append([1e-3, w.flops / peak.peak_flops])
    rest.append(p.ms * 1e-3 - w.bytes / peak.bandwidth)
  seconds = np.array([p.ms * 1e-3 for p in use])
  coef, _ = nnls(np.array(rows) / seconds[:, None], np.array(rest) / seconds)
  overhead_ms, inv_mfu = coef
  return {"step_overhead_ms": round(float(overhead_ms), 2),
          "mfu": round(1 / inv_mfu, 3) if inv_mfu else None}


def table(hw, cards: dict) -> tuple[str, list[float]]:
  """The points beside the preset's predictions, and the relative errors of the fitted ones."""
  lines = [f"{hw.name}: mbu {hw.mbu}, mfu {hw.mfu}, step overhead {hw.step_overhead_ms} ms, "
           f"compute and memory {'overlapped (max)' if hw.overlap else 'added'}",
           "| model | step | context | measured (ms) | predicted (ms) | error | source |",
           "|---|---|---|---|---|---|---|"]
  errors = []
  for p in points(hw):
    pred = predict(hw, cards[p.model], p)
    err = pred / p.ms - 1
    if p.fit:
      errors.append(err)
    lines.append(f"| {p.model} | {p.label} | {p.context} | {p.ms:.2f} | {pred:.2f} | "
                 f"{100 * err:+.0f}%{'' if p.fit else ' (not fitted)'} | {p.source} |")
  return "\n".join(lines), errors
