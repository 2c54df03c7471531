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
             p))` per second, and prefills a prompt of the recent mean length L in
             `max(1, L / p)` such steps. A width whose steps were not timed yet is predicted
             from the nearest one that was: its per-token cost scaled by the share of the
             model's work one device does (b x w0 / w), its fixed cost kept.

A step is timed when it is collected: from its launch, or from the collect of its span's step
before it if that was later (with overlap the device runs a span's steps back to back), until
its sampled ids are on the host.

`predict` gives a `Prediction` for the groups that would carry the ordinary requests in each
candidate partition: every group of a uniform width, the replicas of a mixed partition (its wide
group is kept for latency-critical requests): their prefill rate, the share of it the arriving
prompts would use, and an ordinary request's first-token time, the service time stretched by the
queue (service / (1 - share)). A policy compares candidates by it.
"""

from __future__ import annotations

import collections
import dataclasses

FORGET = 0.98         # weight left to the steps before each new one, per width
MIN_STEPS = 8         # steps of a width before its fit is used


class StepFit:
  """`seconds = a + b x tokens` by least squares over steps weighed FORGET^age."""

  def __init__(self):
    self.sums = [0.0] * 5                        # n, x, y, xx, xy (weighted)
    self.steps = 0
    self._coefficients: tuple[float, float] | None = None

  def add(self, tokens: float, seconds: float):
    n, x, y, xx, xy = self.sums
    f = FORGET
    self.sums = [f * n + 1.0, f * x + tokens, f * y + seconds, f * xx + tokens * tokens,
                 f * xy + tokens * seconds]
    self.steps += 1
    self._coefficients = None

  def coefficients(self) -> tuple[float, float]:
    """(a, b); steps all alike (no spread of tokens to fit a slope on) count as all per token,
    as compute-bound prefill steps are. Computed once per step added."""
    if self._coefficients is None:
      self._coefficients = self._solve()
    return self._coefficients

  def _solve(self) -> tuple[float, float]:
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
  def __init__(self, window: int = 64, urgent_window: int = 16):
    self._arrivals: collections.deque = collections.deque(maxlen=window)   # (time, tokens)
    self._urgent: collections.deque = collections.deque(maxlen=urgent_window)   # times
    self.fits: dict[int, StepFit] = {}           # width -> its steps' fit
    self._span_done: dict[int, float] = {}       # span (first group) -> its last collect

  # demand --------------------------------------------------------------------------------------
  def arrived(self, t: float, tokens: int, urgent: bool = False):
    self._arrivals.append((t, tokens))
    if urgent:
      self._urgent.append(t)

  def urgent_per_s(self, now: float) -> float:
    """Latency-critical requests arriving per second: the last of them from the oldest until now
    (0 until two have arrived)."""
    if len(self._urgent) < 2:
      return 0.0
    span = max(now, self._urgent[-1]) - self._urgent[0]
    return len(self._urgent) / span if span > 0 else 0.0

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

  def mean_prompt(self) -> float:
    """Mean prompt tokens of the last arrivals (0: none yet)."""
    return sum(n for _, n in self._arrivals) / len(self._arrivals) if self._arrivals else 0.0

  def step_models(self, widths) -> dict[int, tuple[float, float]]:
    """(a, b) of a step's time at each of `widths`: fitted, or from the nearest width fitted,
    its per-token cost scaled by the share of the work one device does (w0 / w) and its fixed
    cost kept (empty: none fitted yet)."""
    fitted = {w: f.coefficients() for w, f in self.fits.items() if f.steps >= MIN_STEPS}
    if not fitted:
      return {}
    out = {}
    for w in widths:
      w0 = w if w in fitted else min(fitted, key=lambda v: (abs(v - w), v))
      a, b = fitted[w0]
      out[w] = (a, b * w0 / w)
    return out

  def serve(self, models: dict, widths, decodes: float, budget: int,
            per_step: int) -> Prediction:
    """What groups of `widths` give prompts while they carry `decodes` decode rows in all, each
    prefilling up to `per_step` tokens within `budget` a step; `models` from `step_models`."""
    rate = service = 0.0
    d = decodes / max(1, len(widths))
    prompt = max(1.0, self.mean_prompt())
    p = max(1.0, min(per_step, budget - d))
    for w in widths:
      a, b = models[w]
      rate += p / (a + b * (d + p))
      service = max(service, max(1.0, prompt / p) * (a + b * (d + min(prompt, p))))
    return Prediction(rate, service)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """What a set of groups gives the ordinary requests, predicted from the live cost model."""
  tok_s: float             # prompt tokens per second they prefill
  service_s: float         # time to prefill one prompt of the mean length with no queue

  def share(self, demand_tok_s: float) -> float:
    return demand_tok_s / self.tok_s

  def ttft_s(self, demand_tok_s: float) -> float:
    """The first-token time of an ordinary request under `demand_tok_s` arriving: the service
    time stretched by the queue, service / (1 - share) (a single-server queue's sojourn), inf
    at or beyond the rate."""
    share = self.share(demand_tok_s)
    return self.service_s / (1.0 - share) if share < 1.0 else float("inf")


def alone_s(demand: Demand, widths, limits, models: dict | None = None) -> dict:
  """Per width, the predicted time one group of it takes to prefill a prompt of the recent mean
  length with nothing else to do (a pause for one prefill; empty until steps were fitted).
  `models`: `demand.step_models` of at least `widths`, when already at hand."""
  models = demand.step_models(widths) if models is None else models
  per_step = max(rows * chunk for rows, chunk in limits.prefill_modes)
  return {w: demand.serve(models, [w], 0, limits.token_budget, per_step).service_s
          for w in widths if w in models}


def predict(demand: Demand, partitions: dict, others_running: int, limits,
            models: dict | None = None) -> dict:
  """A `Prediction` for the ordinary requests in each candidate partition: uniform widths keyed
  by width, mixed partitions by name (their replicas only), for `others_running` ordinary
  sequences decoding; `limits` the scheduler's. Empty until a width's steps were fitted.
  `models`: `demand.step_models` of every width, when already at hand."""
  if models is None:
    models = demand.step_models({w for part in partitions.values() for w in part.widths})
  if not models:
    return {}
  per_step = max(rows * chunk for rows, chunk in limits.prefill_modes)
  out = {}
  for name, part in partitions.items():
    w = part.uniform_width
    carriers = part.widths if w is not None else [x for x in part.widths if x < max(part.widths)]
    pred = demand.serve(models, carriers, others_running, limits.token_budget, per_step)
    if pred.tok_s > 0:
      out[w if w is not None else name] = pred
  return out
