"""The live cost model (`engine.demand`) and the predictions the policies take from it."""

import dataclasses

import numpy as np
import pytest

from flying_jax.engine.demand import Demand, StepFit, capacity_of
from flying_jax.engine.policies import AutoPolicy, Observation, PriorityPolicy
from flying_jax.engine.scheduler import GroupWork, SchedulerLimits
from flying_jax.parallel import Partition

CAP = {1: 192, 2: 384, 4: 768, 8: 1536}


def obs(**kw):
  base = dict(width=1, widths=(1, 2, 4, 8), capacity=CAP, waiting=0, running=0, paused=0,
              paused_widths=(), waiting_max_length=0, max_priority=0, oldest_wait_s=0.0,
              kv_usage=0.0, step=0)
  base.update(kw)
  return Observation(**base)


def test_step_fit_recovers_a_linear_step_time_and_forgets_old_steps():
  fit = StepFit()
  rng = np.random.default_rng(0)
  for tokens in rng.integers(1, 1024, 200):
    fit.add(float(tokens), 0.002 + 1e-5 * tokens)
  a, b = fit.coefficients()
  assert a == pytest.approx(0.002, rel=1e-6) and b == pytest.approx(1e-5, rel=1e-6)
  for tokens in rng.integers(1, 1024, 400):     # the hardware got twice as slow
    fit.add(float(tokens), 2 * (0.002 + 1e-5 * tokens))
  a, b = fit.coefficients()
  assert a == pytest.approx(0.004, rel=0.01) and b == pytest.approx(2e-5, rel=0.01)
  same = StepFit()
  for _ in range(20):                          # every step alike: all of it per token
    same.add(512.0, 0.01)
  assert same.coefficients() == pytest.approx((0.0, 0.01 / 512))


def _work(decode: int, prefill: int):
  class Row:
    length = prefill
  return GroupWork(decode=[object()] * decode, prefills=[Row()] if prefill else [])


def test_steps_are_timed_from_launch_or_the_span_s_collect_before():
  d = Demand()
  # two steps of one span back to back (overlap): the second is timed from the first's collect
  d.collected(0, 1, [_work(4, 100)], launched_at=0.0, now=1.0)
  d.collected(0, 1, [_work(4, 100)], launched_at=0.5, now=1.8)
  assert d.fits[1].sums[2] == pytest.approx(0.98 * 1.0 + 0.8)
  d.new_partition()                            # a new partition's spans start afresh
  d.collected(0, 1, [_work(4, 100)], launched_at=5.0, now=5.5)
  assert d.fits[1].sums[2] == pytest.approx(0.98 * (0.98 + 0.8) + 0.5)
  # the busiest group's tokens count (groups run side by side)
  d.collected(3, 2, [_work(1, 10), _work(2, 300)], launched_at=6.0, now=6.1)
  assert d.fits[2].sums[1] == pytest.approx(302)


def test_prompt_rate_is_measured_from_arrivals_and_falls_when_they_stop():
  d = Demand(window=16)
  assert d.prompt_tok_s(0.0) == 0.0
  for i in range(16):
    d.arrived(0.1 * i, 500)
  assert d.prompt_tok_s(1.5) == pytest.approx(16 * 500 / 1.5)
  assert d.prompt_tok_s(15.0) == pytest.approx(16 * 500 / 15.0)   # nothing since: it falls


def test_capacity_of_predicts_every_candidate_from_the_widths_timed():
  d = Demand()
  for tokens in (100, 400, 700, 1000, 200, 600, 900, 300):   # width 1: 2 ms + 20 us per token
    d.collected(0, 1, [_work(0, tokens)], launched_at=0.0, now=0.002 + 2e-5 * tokens)
    d.new_partition()
  limits = SchedulerLimits(max_decode=64, prefill_modes=((1, 1024), (4, 256)), token_budget=1280)
  parts = {p.name: p for p in (Partition.uniform(8, 1), Partition.uniform(8, 8),
                               Partition.parse("4+1x4", 8))}
  cap = capacity_of(d, parts, others_running=80, limits=limits)
  one = 1024 / (0.002 + 2e-5 * (10 + 1024))            # a width-1 group carrying 10 decodes
  assert cap[1] == pytest.approx(8 * one, rel=1e-6)
  # width 8 not timed: one device does an eighth of the work, so its step takes an eighth
  assert cap[8] == pytest.approx(1024 / ((0.002 + 2e-5 * (80 + 1024)) / 8), rel=1e-6)
  # the mixed partition's four replicas carry the ordinary requests, 20 decodes each
  assert cap["4+1x4"] == pytest.approx(4 * 1024 / (0.002 + 2e-5 * (20 + 1024)), rel=1e-6)
  assert capacity_of(Demand(), parts, 80, limits) == {}        # nothing timed: no prediction


def test_priority_chooses_a_layout_that_keeps_up_with_the_arrivals():
  p = PriorityPolicy(max_share=0.8)
  base = obs(width=1, running=100, waiting=20, max_priority=1, priority_inflight=1,
             decode_slots=32, mixed={"4+1x4": 4}, mixed_slots={"4+1x4": 128},
             capacity_tok_s={1: 300e3, 8: 150e3, "4+1x4": 150e3})
  light = dataclasses.replace(base, prompt_tok_s=100e3)
  assert p.decide(light).partition == "4+1x4"           # replicas at 67% of their rate
  heavy = dataclasses.replace(base, prompt_tok_s=140e3)
  assert p.decide(heavy) is None                       # 93%: served where the rest are
  few = dataclasses.replace(base, running=5, waiting=1,
                            capacity_tok_s={1: 300e3, 8: 120e3, "4+1x4": 150e3})
  assert p.decide(dataclasses.replace(few, prompt_tok_s=90e3)).partition == 8
  # everyone fits TP8's slots, but TP8 would not keep up: not TP8, the replicas carry them
  assert p.decide(dataclasses.replace(few, prompt_tok_s=110e3)).partition == "4+1x4"
  no_mixed = dataclasses.replace(base, mixed={}, mixed_slots={})
  assert p.decide(dataclasses.replace(no_mixed, prompt_tok_s=100e3)).strategy == "pause"
  assert p.decide(dataclasses.replace(no_mixed, prompt_tok_s=130e3)) is None   # no pause either
  unknown = dataclasses.replace(few, capacity_tok_s={}, prompt_tok_s=1e9)
  assert p.decide(unknown).partition == 8               # nothing timed yet: as before


def test_auto_leaves_a_wide_layout_predicted_not_to_keep_up():
  p = AutoPolicy()
  in_tp = obs(width=8, running=40, waiting=2, max_priority=1, priority_inflight=1,
              capacity_tok_s={1: 300e3, 8: 150e3, "4+1x4": 150e3})
  assert p.decide(dataclasses.replace(in_tp, prompt_tok_s=140e3)) is None
  d = p.decide(dataclasses.replace(in_tp, prompt_tok_s=160e3))
  assert (d.partition, d.strategy, d.reason) == (1, "migrate", "priority:overloaded")
  mixed = dataclasses.replace(in_tp, width=None, partition="4+1x4", widest=4, mixed={"4+1x4": 4},
                              prompt_tok_s=160e3)
  assert p.decide(mixed).reason == "priority:overloaded"
