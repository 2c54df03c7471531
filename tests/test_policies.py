"""Policies: pure decisions on hand-made observations, then on a real (tiny) engine."""

import dataclasses

import numpy as np
import pytest

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.demand import Demand
from flying_jax.engine.engine import Engine, RequestRejected
from flying_jax.engine.policies import (AutoPolicy, LoadPolicy, MemoryPolicy, PriorityPolicy,
                                        make_policy)
from flying_jax.engine.setup import EngineConfig
from flying_jax.sampling import SamplingParams
from helpers import obs


def test_make_policy_parses_and_refuses():
  assert isinstance(make_policy("auto"), AutoPolicy)
  assert make_policy("static:4").width == 4 and make_policy("static:4+1x4").width == "4+1x4"
  assert make_policy(None).decide(obs()) is None
  for bad in ("static", "static:x", "fastest", "load:3"):
    with pytest.raises(ValueError):
      make_policy(bad)


def test_load_policy_has_hysteresis():
  p = LoadPolicy(high=8, low=2, hold_steps=3)
  busy = obs(width=8, waiting=6, running=4, prefilling=2)        # 8 without a first token
  assert [p.decide(busy) for _ in range(2)] == [None, None]       # not yet: must hold 3 steps
  d = p.decide(busy)
  assert d.partition == 1 and d.reason == "load:busy"
  middling = obs(width=1, waiting=4, running=3)                   # between low and high: stay
  assert all(p.decide(middling) is None for _ in range(10))
  quiet = obs(width=1, running=1)
  assert [p.decide(quiet) for _ in range(2)] == [None, None]
  assert p.decide(quiet).partition == 8


def test_load_policy_goes_tp_only_when_the_running_requests_fit_a_tp_group():
  p = LoadPolicy(hold_steps=1)
  assert p.decide(obs(width=1, running=20, decode_slots=32)) is None        # 20 > 32 / 2
  assert p.decide(obs(width=1, running=16, decode_slots=32)).partition == 8
  assert p.decide(obs(width=1, running=3, prefilling=3, decode_slots=32)) is None   # a queue
  assert p.decide(obs(width=8, running=30, prefilling=9, decode_slots=32)).reason == "load:busy"
  assert p.decide(obs(width=8, running=30, prefilling=9)).strategy == "migrate"


def test_load_policy_leaves_tp_only_for_a_queue_that_waits():
  """A queue the partition in force serves as fast as it comes (its oldest request without a
  first token is younger than `busy_steps` steps) is no reason to go DP; one that waits is."""
  p = LoadPolicy(high=8, hold_steps=1, busy_steps=16)
  keeping_up = obs(width=8, waiting=6, running=4, prefilling=4, step_s=0.005,
                   oldest_unstarted_s=0.05)
  assert all(p.decide(keeping_up) is None for _ in range(5))
  falling_behind = dataclasses.replace(keeping_up, oldest_unstarted_s=0.09)
  assert p.decide(falling_behind).reason == "load:busy"


def test_auto_leaves_a_wide_group_that_cannot_keep_up_despite_priority():
  """Priority requests hold the engine in a wide group only while the queue keeps up: once the
  load policy's busy signal has held, auto goes DP (no suppression without a bound), and it
  follows priority again when the queue is served as fast as it comes."""
  p = AutoPolicy(load=LoadPolicy(high=8, hold_steps=2, busy_steps=16),
                 priority=PriorityPolicy(until_first_token=False))
  behind = obs(width=8, waiting=12, running=30, prefilling=4, max_priority=1,
               priority_inflight=1, step_s=0.01, oldest_unstarted_s=1.0)
  assert p.decide(behind) is None                          # a priority request holds TP8 ...
  d = p.decide(behind)                                     # ... until the queue has waited
  assert (d.partition, d.reason) == (1, "load:busy")
  keeping_up = dataclasses.replace(behind, width=1, waiting=2, prefilling=1,
                                   oldest_unstarted_s=0.02, step=50)
  assert p.decide(keeping_up) is None                      # backing off: 100 steps ...
  again = p.decide(dataclasses.replace(keeping_up, step=100))
  assert (again.partition, again.reason) == (8, "priority")       # ... then wide again
  p.decide(dataclasses.replace(behind, step=101))
  d = p.decide(dataclasses.replace(behind, step=102))             # a second failure ...
  assert d.reason == "load:busy"
  assert p.decide(dataclasses.replace(keeping_up, step=250)) is None   # ... backs off 200 steps
  assert p.decide(dataclasses.replace(keeping_up, step=302)).reason == "priority"
  # held only until the first token (the default), a pause into TP8 ends by itself: made even
  # while backing off from a wide layout that could not keep up
  brief = AutoPolicy(load=LoadPolicy(high=8, hold_steps=2, busy_steps=16))
  brief.decide(behind)
  assert brief.decide(behind).reason == "load:busy"
  d = brief.decide(keeping_up)
  assert (d.partition, d.strategy, d.reason) == (8, "pause", "priority")


def test_priority_moves_everyone_to_tp_when_they_fit_and_keeps_replicas_that_carry_the_rest():
  p = PriorityPolicy()
  few = obs(width=1, running=5, waiting=1, max_priority=1, priority_inflight=1, decode_slots=32,
            mixed={"4+1x4": 4}, mixed_slots={"4+1x4": 128})
  d = p.decide(few)                        # all fit one TP group's slots: all migrate, none paused
  assert (d.partition, d.strategy, d.reason) == (8, "migrate", "priority")
  many = dataclasses.replace(few, running=100, waiting=20)
  assert p.decide(many).partition == "4+1x4"          # the replicas hold the other 119
  too_many = dataclasses.replace(many, running=200)
  # they would not: paused for the priority request's prefill in TP8 (held to its end: served
  # where it is)
  assert (p.decide(too_many).partition, p.decide(too_many).strategy) == (8, "pause")
  assert PriorityPolicy(until_first_token=False).decide(too_many) is None


def test_load_policy_ends_a_tp_episode_for_a_request_waiting_too_long():
  p = LoadPolicy(high=100, max_wait_s=1.0)
  assert p.decide(obs(width=8, waiting=1, oldest_wait_s=0.5)) is None
  assert p.decide(obs(width=8, waiting=1, oldest_wait_s=1.5)).partition == 1
  # admitted and still prefilling counts too (a slow machine's TP8 admits a burst at once) ...
  prefilling = obs(width=8, running=6, prefilling=3, oldest_unstarted_s=1.5)
  assert p.decide(prefilling).reason == "load:busy"
  # ... but a lone long prompt is not a queue
  assert p.decide(dataclasses.replace(prefilling, prefilling=1)) is None


def test_priority_and_memory_policies():
  assert PriorityPolicy().decide(obs(max_priority=1)) == dataclasses.replace(
      PriorityPolicy().decide(obs(max_priority=1)), partition=8, strategy="pause")
  assert PriorityPolicy().decide(obs(width=8, max_priority=1)) is None
  back = PriorityPolicy().decide(obs(width=8, paused=2, paused_widths=(1,)))
  assert (back.partition, back.strategy, back.reason) == (1, "migrate", "resume")
  assert PriorityPolicy().decide(obs(width=8, max_priority=1, paused_widths=(1,))) is None
  # a priority request holds the wide group until its first token; then its decode goes on
  # where the paused ones return (or, with until_first_token off, the group is held to its end)
  started = obs(width=8, max_priority=1, max_priority_unstarted=0, paused=2, paused_widths=(1,))
  assert PriorityPolicy().decide(started).reason == "resume"
  assert PriorityPolicy(until_first_token=False).decide(started) is None
  assert MemoryPolicy().decide(obs(waiting_max_length=500)).partition == 4   # narrowest that holds it
  assert MemoryPolicy().decide(obs(waiting_max_length=100)) is None
  assert MemoryPolicy().decide(obs(waiting_max_length=10**6)) is None    # nothing holds it


def test_auto_policy_orders_memory_priority_load():
  p = AutoPolicy(load=LoadPolicy(hold_steps=1))
  assert p.decide(obs(waiting_max_length=1000, max_priority=1)).reason == "memory"
  assert p.decide(obs(max_priority=1)).reason == "priority"
  assert p.decide(obs(width=4, waiting=20, waiting_max_length=500)) is None  # keep the wide group
  assert p.decide(obs(width=8, waiting=20, running=8)).reason == "load:busy"
  back = p.decide(obs(width=8, paused=3, paused_widths=(1,)))
  assert (back.partition, back.strategy, back.reason) == (1, "migrate", "resume")


# ---------------------------------------------------------------- on the engine
@pytest.fixture(scope="module")
def engine():
  """Widths 1 and 8 with 4 pages per device: one DP group holds 192 tokens, a TP8 group 1536."""
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(8,),
                               prefill_chunks=(32,), token_budget=40)
  return Engine(load_model_card("tiny"), preset,
                EngineConfig(widths=(1, 8), width=1, pages_per_device=4))


def drain(engine, max_steps=3000):
  for _ in range(max_steps):
    if not engine.has_unfinished():
      return
    engine.step()
  raise AssertionError("did not finish")


def test_memory_policy_serves_what_static_dp_refuses(engine):
  prompt = np.random.default_rng(3).integers(0, 512, size=300).tolist()
  params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
  engine.set_width(1)
  engine.policy = make_policy("static:1")
  with pytest.raises(RequestRejected, match="192 tokens"):
    engine.add_request("long-static", prompt, params)
  assert engine.no_leaks()
  engine.policy = make_policy("auto")
  engine.add_request("long-auto", prompt, params)
  drain(engine)
  got = engine.request("long-auto")[0]
  assert got.finish_reason == "length" and len(got.output_ids) == 20
  assert any(r.reason == "memory" and r.to_width == 8 for r in engine.switches)
  engine.policy = make_policy(None)
  engine.set_width(8)
  engine.add_request("long-tp8", prompt, params)
  drain(engine)
  assert engine.request("long-tp8")[0].output_ids == got.output_ids
  assert engine.no_leaks()


@pytest.mark.parametrize("policy", ["auto", "priority"])
@pytest.mark.parametrize("n_bg,strategy", [(6, "migrate"), (12, "pause")])
def test_priority_request_moves_the_engine_to_tp_and_nothing_is_lost(engine, policy, n_bg,
                                                                     strategy):
  """Everyone fits one TP group's decode slots (8): all migrate there; more than that: the
  others pause and resume in their own layout once the priority request is done."""
  engine.policy = make_policy(None)
  engine.set_width(1)
  # the mechanism, not the predictions (tests/test_demand.py): nothing predicted at the move,
  # and auto does not leave TP8 early on what the tiny model's steps predict
  engine.policy = make_policy(policy)
  engine.demand = Demand()
  if policy == "auto":
    engine.policy.leave = float("inf")
  rng = np.random.default_rng(4)
  params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
  tag = f"{policy}-{n_bg}"
  for i in range(n_bg):
    engine.add_request(f"bg-{tag}-{i}", rng.integers(0, 512, size=20).tolist(), params)
  engine.step()
  engine.add_request(f"urgent-{tag}", rng.integers(0, 512, size=20).tolist(), params, priority=1)
  before = len(engine.switches)
  engine.step()
  last = engine.switches[-1]
  assert engine.width == 8 and (last.reason, last.strategy) == ("priority", strategy)
  assert (last.paused > 0) == (strategy == "pause")
  drain(engine)
  if strategy == "pause":
    assert any(r.reason == "resume" for r in engine.switches[before:])   # the paused came back
  for rid in [f"bg-{tag}-{i}" for i in range(n_bg)] + [f"urgent-{tag}"]:
    seq, = engine.request(rid)
    assert seq.finished and len(seq.output_ids) == 24
  assert engine.no_leaks()


def test_load_policy_goes_dp_under_a_burst_and_back_to_tp_when_quiet(engine):
  engine.policy = make_policy(None)
  engine.set_width(8)
  engine.policy = LoadPolicy(high=6, low=1, hold_steps=2, busy_steps=2)
  rng = np.random.default_rng(5)
  params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
  for i in range(12):
    engine.add_request(f"burst-{i}", rng.integers(0, 512, size=10).tolist(), params)
  widths = []
  while engine.has_unfinished():
    engine.step()
    widths.append(engine.width)
  assert 1 in widths                                        # went DP for the burst
  for _ in range(4):                                        # idle steps: quiet -> TP
    engine.step()
  assert engine.width == 8
  assert all(engine.request(f"burst-{i}")[0].finished for i in range(12))
  assert engine.no_leaks()
  # the live cost model timed both widths' steps and predicts every candidate's prefill rate
  assert {1, 8} <= set(engine.demand.fits)
  seen = engine.observe()
  assert seen.prompt_tok_s > 0 and set(seen.predicted) == {1, 8}
  assert all(p.tok_s > 0 and p.service_s > 0 for p in seen.predicted.values())
  engine.policy = make_policy(None)


def test_a_policy_needing_an_uncompiled_width_is_refused_at_start(engine):
  with pytest.raises(ValueError, match="not compiled"):
    Engine(engine.card, engine.preset, EngineConfig(widths=(1,), pages_per_device=4),
           policy="static:8")


def test_a_priority_prompt_takes_the_prefill_budget_first(engine):
  """Two long prompts admitted together to one group, the latency-critical one second: it is
  prefilled first (one 32-token chunk a step here), and both give the tokens they give alone."""
  engine.policy = make_policy(None)
  engine.set_width(8)
  rng = np.random.default_rng(12)
  plain, urgent = (rng.integers(0, 512, size=70).tolist() for _ in range(2))
  greedy = SamplingParams(temperature=0.0, max_tokens=12)
  engine.add_request("plain-first", plain, greedy)
  engine.add_request("urgent-second", urgent, greedy, priority=1)
  drain(engine)
  (p,), (u,) = engine.request("plain-first"), engine.request("urgent-second")
  assert u.first_token_time < p.first_token_time
  for rid, prompt in (("plain-alone", plain), ("urgent-alone", urgent)):
    engine.add_request(rid, prompt, greedy)
    drain(engine)
  assert [p.output_ids, u.output_ids] == [engine.request(r)[0].output_ids
                                          for r in ("plain-alone", "urgent-alone")]
  for rid in ("plain-first", "urgent-second", "plain-alone", "urgent-alone"):
    engine.release(rid)
  assert engine.no_leaks()
