"""Soak: 200 requests arriving over time, cancellations, forced switches and the auto policy.

Nothing is lost or duplicated, no page leaks, and every request that was not cancelled produces
exactly the greedy tokens of a run without any switch.
"""

import dataclasses
import random

import numpy as np
import pytest

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.policies import AutoPolicy, LoadPolicy, make_policy
from flying_jax.engine.setup import EngineConfig
from flying_jax.sampling import SamplingParams

N = 200


@pytest.fixture(scope="module")
def engine():
  """Every width and both mixed partitions, prefills of one long or four short prompts per group
  step. One decode bucket: the other tiny-model engines' (their embed and layer programs are
  shared through the compilation cache instead of compiled again)."""
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(8,),
                               prefill_chunks=(32,), prefill_rows=(1, 4), token_budget=40)
  return Engine(load_model_card("tiny"), preset, EngineConfig(width=1))


def requests(seed):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(N):
    prompt = rng.integers(0, 512, size=int(rng.integers(1, 120))).tolist()
    params = SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 30)), ignore_eos=True)
    out.append((f"q{i}", prompt, params))
  return out


def reference(engine, reqs):
  engine.policy = make_policy(None)
  engine.set_width(1)
  for rid, prompt, params in reqs:
    engine.add_request(f"ref-{rid}", prompt, params)
  while engine.has_unfinished():
    engine.step()
  outs = {rid: engine.request(f"ref-{rid}")[0].output_ids for rid, _, _ in reqs}
  for rid, _, _ in reqs:
    engine.release(f"ref-{rid}")
  return outs


def test_soak_with_switches_cancellations_and_auto_policy(engine):
  reqs = requests(42)
  expected = reference(engine, reqs)
  rng = random.Random(42)
  # no wall-clock rule (max_wait_s, busy_steps): the run is the same on any machine
  engine.policy = AutoPolicy(load=LoadPolicy(high=24, low=4, hold_steps=3, max_wait_s=1e9,
                                             busy_steps=0))
  pending = list(reqs)
  cancelled, added, step = set(), [], 0
  switches_before = len(engine.switches)
  while pending or engine.has_unfinished():
    step += 1
    assert step < 20000, "the soak did not finish"
    for _ in range(rng.randint(0, 4)):                       # arrivals
      if pending:
        rid, prompt, params = pending.pop(0)
        engine.add_request(rid, prompt, params)
        added.append(rid)
    if added and rng.random() < 0.05:                       # a cancellation
      victim = rng.choice(added)
      if victim not in cancelled and engine.abort(victim):
        cancelled.add(victim)
    if step % 5 == 0 and engine._pending is None:           # a forced switch
      engine.switch(rng.choice(list(engine.partitions)),
                    rng.choice(["pause", "recompute", "drain", "migrate"]), reason="soak")
    engine.step()
  assert engine.no_leaks()
  assert sorted(added) == sorted(rid for rid, _, _ in reqs)   # every request entered once
  finished = 0
  for rid, _, params in reqs:
    if rid in cancelled:
      continue
    seq, = engine.request(rid)                              # exactly one sequence (n = 1)
    assert seq.finished and seq.finish_reason == "length"
    assert seq.output_ids == expected[rid], rid
    finished += 1
  assert finished >= N - len(cancelled) and cancelled
  records = engine.switches[switches_before:]
  forced = [r for r in records if r.reason == "soak"]
  assert len(forced) >= 3 and {r.strategy for r in forced} >= {"pause", "recompute", "migrate"}
  assert {r.to_width for r in forced} & {"4+1x4", "2x2+4"}   # mixed partitions too
  assert any(r.reason.startswith("load") for r in records)   # the policy acted too
  engine.policy = make_policy(None)
