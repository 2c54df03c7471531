"""The simulated runtime an `Engine` is built on: a clock, and an executor that advances it.

`SimRuntime(...).build` has the signature of `engine.setup.build_runtime`, so `Engine(...,
runtime=..., clock=...)` gives the real engine (its scheduler, policies, switch strategies, page
pool and output bookkeeping) with nothing of JAX underneath: the span set-ups are the real ones
(head plans, KV geometry, compiled step shapes), the executor picks the same step shape the real
one would, and instead of running programs it moves the clock by the cost model's time for the
step. Migrations move it by the bytes moved over the interconnect; a switch by the host's cost.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flying_jax.engine import setup as S
from flying_jax.parallel import Span
from flying_jax.runtime.executor import Launched, StepResult, pick_shape
from flying_jax.sim.cost import ModelCosts, span_work


def step_work(costs: ModelCosts, spans, work) -> list[tuple]:
  """(SpanWork, compiled shape, groups) of each span of a step: `spans` the partition's
  WidthSetups in device order, `work` one GroupWork per group (the executor's arguments)."""
  out, first = [], 0
  for ws in spans:
    part = work[first:first + ws.specs.groups]
    first += ws.specs.groups
    shape = pick_shape(ws, part)
    out.append((span_work(costs, ws, part, shape), shape, len(part)))
  return out


class SimClock:
  """Simulated seconds; the engine reads it, the executor and the driver move it."""

  def __init__(self, start: float = 0.0):
    self.now = start

  def __call__(self) -> float:
    return self.now

  def advance(self, seconds: float):
    self.now += seconds

  def wait_until(self, t: float):
    self.now = max(self.now, t)


@dataclasses.dataclass
class SimLaunched(Launched):
  result: StepResult | None = None  # what collecting it returns
  end: float = 0.0                  # when the step finishes on the simulated clock


class SimExecutor:
  """Runs a step by advancing the clock; every sampled token is id 0 (requests ignore EOS)."""

  def __init__(self, clock: SimClock, model, costs: ModelCosts, record=None):
    self.clock, self.model, self.costs = clock, model, costs
    self.record = record            # called with (span works, seconds) per step (calibration)
    self._tokens: dict[tuple[int, int], np.ndarray] = {}

  def launch(self, spans, work, banned_for, prev=None, mask_for=None,
             defer=False) -> "SimLaunched":
    """The step starts now and ends after the cost model's time for it (each span its own
    clock: the engine waits for the first span to end, `wait_any`). Token masks are not
    simulated: `mask_for` and `defer` change nothing."""
    parts = step_work(self.costs, spans, work)
    works = [w for w, _, _ in parts]
    shapes = [shape for _, shape, _ in parts]
    group_shapes = [shape for _, shape, groups in parts for _ in range(groups)]
    seconds = self.model.step_time(works)
    if self.record is not None:
      self.record(works, seconds)
    key = (len(work), max(s.rows for s in shapes))
    tokens = self._tokens.get(key)
    if tokens is None:
      tokens = self._tokens[key] = np.zeros(key, np.int32)
    result = StepResult(tokens, None, None, None, [], shapes, group_shapes, 0.0, 0.0)
    return SimLaunched(tuple(spans), work, [], shapes, group_shapes, False, 0.0, 0.0,
                       result=result, end=self.clock() + seconds)

  def sample(self, launched: "SimLaunched"):
    """A deferred sampling (never asked for: `launch` stages nothing)."""

  def ready(self, launched: "SimLaunched") -> bool:
    return self.clock() >= launched.end

  def wait_any(self, launched: list) -> int:
    i = min(range(len(launched)), key=lambda i: launched[i].end)
    self.clock.wait_until(launched[i].end)
    return i

  def collect(self, launched: "SimLaunched") -> StepResult:
    self.clock.wait_until(launched.end)
    return launched.result

  def warm_up(self, partitions) -> float:
    return 0.0


@dataclasses.dataclass
class SimMigrator:
  """Moves a sequence's KV to another group: the bytes over the source group's links."""
  clock: SimClock
  costs: ModelCosts
  link: float                        # bytes/s per chip
  latency: float
  spaces: tuple = ()                 # (layers, pages per device) of each page space

  def move(self, device_pools, arch, src, dst, n_tokens, pages_per_device, slots,
           start: int = 0, space: int = 0) -> int:
    """Tokens [start, n_tokens) of the layers of page space `space` (a hybrid model moves its
    global and its sliding layers apart)."""
    n_tokens -= start
    share = len(self.spaces[space][0]) / self.costs.layers if self.spaces else 1.0
    nbytes = n_tokens * self.costs.kv_bytes_per_token(self.costs.n_kv_heads) * share
    self.clock.advance(self.latency + nbytes / (self.link * min(src.layout.width,
                                                                dst.layout.width)))
    return n_tokens * self.costs.n_kv_heads * self.costs.head_dim

  def __len__(self):
    return 0


@dataclasses.dataclass
class SimResident:
  """Nothing is resident; re-arranging the views for a partition costs the host `switch_s`."""
  clock: SimClock
  switch_s: float

  def arrange(self, spans):
    self.clock.advance(self.switch_s)

  def merge(self):
    pass


class SimRuntime:
  def __init__(self, hw, model, costs: ModelCosts, clock: SimClock, record=None):
    self.hw, self.model, self.costs, self.clock, self.record = hw, model, costs, clock, record

  def build(self, card, preset, cfg, devices, partitions, widths, host_weights, rep) -> S.Runtime:
    n = len(devices)
    pages = cfg.pages_per_device or preset.pages_per_device
    spaces = S.page_spaces(card, preset, cfg, pages)
    spans = sorted({sp for p in partitions.values() for sp in p.spans})
    span_setups = {sp: S.width_setup(card, preset, devices, sp, pages, specs=sp,
                                     local_tables=len(spaces) > 1) for sp in spans}
    setups = {w: span_setups[Span(0, n, w)] for w in widths}
    link = max(self.hw.link_gbps, 1.0) * 1e9
    migrator = (SimMigrator(self.clock, self.costs, link, self.hw.collective_latency_us * 1e-6,
                            spaces) if len(widths) > 1 else None)
    pool, local_pool, local_pages = S.runtime_pools(spaces, n)
    return S.Runtime(pages, span_setups, setups, None, None, pool, None,
                     SimResident(self.clock, self.hw.switch_ms * 1e-3),
                     SimExecutor(self.clock, self.model, self.costs, self.record), migrator,
                     spaces, local_pool, local_pages)
