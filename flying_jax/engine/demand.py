"""What the traffic asks of the engine and what each layout can give it, measured live.

The policies predict from two measured rates instead of raw counts:

  demand     prompt tokens arriving per second: the last `window` arrivals' prompt tokens over the
             time from the oldest of them until now (the engine's clock; scale-free, so it
             adapts to the traffic as it is, and it falls when arrivals stop);
  capacity   prompt tokens per second a set of groups can prefill, from a cost model fitted to
             the steps the engine runs: per width, a step's time is `a + b x tokens` (tokens of
             its busiest group, decode rows + prefill), a least-squares fit over the recent
             steps (older ones weigh less). A group of that width carrying `d` decode rows
             prefills `p = min(prefill per step, budget - d)` tokens a step, so `p / (a + b (d +
             p))` per second. A width whose steps were not timed yet is predicted from the
             nearest one that was, by the share of the model's work one device of it does
             (time x w0 / w).

A step is timed when it is collected: from its launch, or from the collect of its span's step
before it if that was later (with overlap the device runs a span's steps back to back), until
its sampled ids are on the host.

`capacity_of` gives the prediction for the groups that would carry the ordinary requests in each
candidate partition: every group of a uniform width, the replicas of a mixed partition (its wide
group is kept for latency-critical requests). A policy compares `demand / capacity` (the share of
the layout's prefill rate the arriving prompts would use) with a bound: above it the layout
would build a queue.
"""

from __future__ import annotations

import collections

import numpy as np

FORGET = 0.98         # weight left to the steps before each new one, per width
MIN_STEPS = 8         # steps of a width before its fit is used


class StepFit:
  """`seconds = a + b x tokens` by least squares over steps weighed FORGET^age."""

  def __init__(self):
    self.sums = np.zeros(5)                      # n, x, y, xx, xy (weighted)
    self.steps = 0

  def add(self, tokens: float, seconds: float):
    self.sums = FORGET * self.sums + np.array(
        [1.0, tokens, seconds, tokens * tokens, tokens * seconds])
    self.steps += 1

  def coefficients(self) -> tuple[float, float]:
    """(a, b); steps all alike (no spread of tokens to fit a slope on) count as all per token,
    as compute-bound prefill steps are."""
    n, x, y, xx, xy = self.sums
    var = n * xx - x * x
    if var <= 1e-6 * n * xx:
      return 0.0, (y / x if x > 0 else 0.0)
    b = max(0.0, (n * xy - x * y) / var)
    a = (y - b * x) / n
    if a < 0:                                    # a negative intercept: through the origin
      return 0.0, xy / xx
    return a, b


class Demand:
  def __init__(self, window: int = 64):
    self._arrivals: collections.deque = collections.deque(maxlen=window)   # (time, tokens)
    self.fits: dict[int, StepFit] = {}           # width -> its steps' fit
    self._span_done: dict[int, float] = {}       # span (first group) -> its last collect

  # demand --------------------------------------------------------------------------------------
  def arrived(self, t: float, tokens: int):
    self._arrivals.append((t, tokens))

  def prompt_tok_s(self, now: float) -> float:
    """Prompt tokens per second from the oldest of the last arrivals until now (0 until eight
    have arrived)."""
    if len(self._arrivals) < 8:
      return 0.0
    span = max(now, self._arrivals[-1][0]) - self._arrivals[0][0]
    return sum(n for _, n in self._arrivals) / span if span > 0 else 0.0

  # capacity ------------------------------------------------------------------------------------
  def new_partition(self):
    self._span_done.clear()

  def collected(self, span: int, width: int, work, launched_at: float, now: float):
    """Time a step of span `span` (its first group's index) of `width` whose groups did `work`
    (their `GroupWork`s), launched at `launched_at` and collected `now`."""
    start = max(launched_at, self._span_done.get(span, launched_at))
    self._span_done[span] = now
    tokens = max((len(g.decode) + g.prefill_tokens for g in work), default=0)
    if now > start and tokens:
      self.fits.setdefault(width, StepFit()).add(tokens, now - start)

  def step_model(self, width: int) -> tuple[float, float] | None:
    """(a, b) of a step's time at `width`: fitted, or scaled from the nearest width fitted
    (None: none yet)."""
    fitted = {w: f for w, f in self.fits.items() if f.steps >= MIN_STEPS}
    if not fitted:
      return None
    w0 = width if width in fitted else min(fitted, key=lambda w: (abs(w - width), w))
    a, b = fitted[w0].coefficients()
    return a * w0 / width, b * w0 / width

  def prefill_tok_s(self, widths, decodes: float, budget: int, per_step: int) -> float:
    """Prompt tokens per second groups of `widths` prefill while they carry `decodes` decode rows
    in all, each prefilling up to `per_step` tokens within `budget` a step (0: not known yet)."""
    total = 0.0
    d = decodes / max(1, len(widths))
    for w in widths:
      model = self.step_model(w)
      if model is None:
        return 0.0
      a, b = model
      p = max(0.0, min(per_step, budget - d))
      t = a + b * (d + p)
      total += p / t if t > 0 else 0.0
    return total


def capacity_of(demand: Demand, partitions: dict, others_running: int, limits) -> dict:
  """Predicted prefill rate (prompt tokens/s) for the ordinary requests in each candidate
  partition: uniform widths keyed by width, mixed partitions by name (their replicas only), for
  `others_running` ordinary sequences decoding; `limits` the scheduler's. Empty until a width's
  steps were fitted."""
  if not demand.fits:
    return {}
  per_step = max(rows * chunk for rows, chunk in limits.prefill_modes)
  out = {}
  for name, part in partitions.items():
    w = part.uniform_width
    carriers = part.widths if w is not None else [x for x in part.widths if x < max(part.widths)]
    rate = demand.prefill_tok_s(carriers, others_running, limits.token_budget, per_step)
    if rate > 0:
      out[w if w is not None else name] = rate
  return out
