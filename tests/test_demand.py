"""The live cost model (`engine.demand`) and the predictions the policies take from it."""

import dataclasses

import numpy as np
import pytest

from flying_jax.engine.demand import Demand, Prediction, StepFit, alone_s, predict
from flying_jax.engine.policies import AutoPolicy, PriorityPolicy
from flying_jax.engine.scheduler import GroupWork, SchedulerLimits
from flying_jax.parallel import Partition
from helpers import obs


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
  assert d.urgent_per_s(15.0) == 0.0                                # none was latency-critical
  for i in range(4):
    d.arrived(16.0 + i, 500, urgent=True)
  assert d.urgent_per_s(20.0) == pytest.approx(4 / 4.0)


def test_predict_gives_every_candidate_from_the_widths_timed():
  d = Demand()
  for tokens in (100, 400, 700, 1000, 200, 600, 900, 300):   # width 1: 2 ms + 20 us per token
    d.collected(0, 1, [_work(0, tokens)], launched_at=0.0, now=0.002 + 2e-5 * tokens)
    d.new_partition()
  for i in range(10):
    d.arrived(0.01 * i, 512)                                 # prompts of 512 tokens
  limits = SchedulerLimits(max_decode=64, prefill_modes=((1, 1024), (4, 256)), token_budget=1280)
  parts = {p.name: p for p in (Partition.uniform(8, 1), Partition.uniform(8, 8),
                               Partition.parse("4+1x4", 8))}
  pred = predict(d, parts, others_running=80, limits=limits)
  one = 0.002 + 2e-5 * (10 + 1024)                         # a width-1 group carrying 10 decodes
  assert pred[1].tok_s == pytest.approx(8 * 1024 / one, rel=1e-6)
  assert pred[1].service_s == pytest.approx(0.002 + 2e-5 * (10 + 512), rel=1e-6)
  # width 8 not timed: one device does an eighth of the per-token work; the fixed cost stays
  eight = 0.002 + 2e-5 / 8 * (80 + 1024)
  assert pred[8].tok_s == pytest.approx(1024 / eight, rel=1e-6)
  # the mixed partition's four replicas carry the ordinary requests, 20 decodes each
  assert pred["4+1x4"].tok_s == pytest.approx(4 * 1024 / (0.002 + 2e-5 * 1044), rel=1e-6)
  # first-token time: the service time stretched by the queue, infinite past the rate
  p = pred["4+1x4"]
  assert p.ttft_s(0.5 * p.tok_s) == pytest.approx(2 * p.service_s)
  assert p.ttft_s(p.tok_s) == float("inf")
  assert predict(Demand(), parts, 80, limits) == {}           # nothing timed: no prediction
  # one prompt alone in a group of each width (a pause for one prefill): no decodes beside it
  alone = alone_s(d, (1, 8), limits)
  assert alone[1] == pytest.approx(0.002 + 2e-5 * 512, rel=1e-6)
  assert alone[8] == pytest.approx(0.002 + 2e-5 / 8 * 512, rel=1e-6)


def _pred(ttft_ms: float, share: float, demand: float = 100e3):
  """A Prediction whose ttft_s(demand) and share(demand) are the given ones."""
  rate = demand / share
  return Prediction(rate, ttft_ms * 1e-3 * (1 - share))


def test_priority_moves_only_where_the_others_do_not_wait_longer():
  p = PriorityPolicy(until_first_token=False)        # a wide layout held to the request's end
  base = obs(width=1, running=100, waiting=20, max_priority=1, priority_inflight=1,
             decode_slots=32, mixed={"4+1x4": 4}, mixed_slots={"4+1x4": 128},
             prompt_tok_s=100e3)
  def at(**ttft_share):
    return dataclasses.replace(base, predicted={int(k[1:]) if k != "mixed" else "4+1x4":
                                                _pred(*v) for k, v in ttft_share.items()})
  # the replicas would keep the ordinary requests' first token within 10%: mixed
  assert p.decide(at(w1=(100, 0.3), w8=(300, 0.9), mixed=(108, 0.6))).partition == "4+1x4"
  # 30% slower there, or too busy: served where the rest are
  assert p.decide(at(w1=(100, 0.3), w8=(300, 0.9), mixed=(130, 0.6))) is None
  assert p.decide(at(w1=(100, 0.3), w8=(300, 0.9), mixed=(105, 0.85))) is None
  few = dataclasses.replace(base, running=5, waiting=1)
  assert p.decide(dataclasses.replace(few, predicted=at(
      w1=(100, 0.3), w8=(90, 0.5), mixed=(200, 0.6)).predicted)).partition == 8
  # everyone fits TP8's slots, but TP8 would make them wait: the replicas carry them instead
  assert p.decide(dataclasses.replace(few, predicted=at(
      w1=(100, 0.3), w8=(150, 0.7), mixed=(105, 0.6)).predicted)).partition == "4+1x4"
  no_mixed = dataclasses.replace(base, mixed={}, mixed_slots={})
  assert p.decide(dataclasses.replace(no_mixed, predicted=at(
      w1=(100, 0.3), w8=(95, 0.5)).predicted)).strategy == "pause"
  assert p.decide(dataclasses.replace(no_mixed, predicted=at(
      w1=(100, 0.3), w8=(400, 0.95)).predicted)) is None          # no pause into that either
  assert p.decide(dataclasses.replace(few, predicted={})).partition == 8   # not known: as before
  # held only until the first token (the default), a pause into TP8 lasts one prefill: made even
  # where TP8 would not keep up with the arrivals for long
  brief = PriorityPolicy()
  for busy in (at(w1=(100, 0.3), w8=(300, 0.9), mixed=(130, 0.6)),
               dataclasses.replace(no_mixed, predicted=at(w1=(100, 0.3), w8=(400, 0.95)).predicted)):
    d = brief.decide(busy)
    assert (d.partition, d.strategy) == (8, "pause")
    # ... while the rest would be paused at most 10% of the time (0.5/s x 0.1 s: 5%; 2/s: 20%)
    rare = dataclasses.replace(busy, alone_s={8: 0.1}, urgent_per_s=0.5)
    assert brief.decide(rare).strategy == "pause"
    assert brief.decide(dataclasses.replace(rare, urgent_per_s=2.0)) is None
  assert brief.decide(at(w1=(100, 0.3), w8=(300, 0.9), mixed=(108, 0.6))).partition == "4+1x4"


def test_auto_leaves_a_wide_layout_predicted_to_make_the_others_wait_and_backs_off():
  p = AutoPolicy()
  in_tp = obs(width=8, running=40, waiting=2, max_priority=1, priority_inflight=1,
              prompt_tok_s=100e3, decode_slots=64)
  fine = {1: _pred(100, 0.3), 8: _pred(120, 0.6)}
  assert p.decide(dataclasses.replace(in_tp, predicted=fine)) is None       # 1.2x: within 1.25
  slow = {1: _pred(100, 0.3), 8: _pred(140, 0.7)}
  d = p.decide(dataclasses.replace(in_tp, predicted=slow, step=10))
  assert (d.partition, d.strategy, d.reason) == (1, "migrate", "priority:overloaded")
  # back on DP, a priority move would now look fine, but it waits out the back-off (100 steps)
  on_dp = dataclasses.replace(in_tp, width=1, running=10, predicted={1: _pred(100, 0.3),
                                                                     8: _pred(80, 0.4)})
  assert p.decide(dataclasses.replace(on_dp, step=50)) is None
  assert p.decide(dataclasses.replace(on_dp, step=111)).reason == "priority"
  mixed = dataclasses.replace(in_tp, width=None, partition="4+1x4", widest=4,
                              mixed={"4+1x4": 4}, predicted={**slow, "4+1x4": _pred(200, 0.8)})
  assert p.decide(mixed).reason == "priority:overloaded"
