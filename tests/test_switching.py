"""Switching the partition while requests are in flight (tiny model, 8 simulated devices).

Invariants: greedy ids equal a run without switches, whatever the sequence of widths and
strategies; no page leaks; no request lost or duplicated; weights never move.
"""

import dataclasses
import itertools
import random

import numpy as np
import pytest

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.sequence import Status
from flying_jax.engine.setup import EngineConfig
from flying_jax.parallel import Partition
from flying_jax.sampling import SamplingParams

WIDTHS = (1, 2, 4, 8)
_ids = itertools.count()


@pytest.fixture(scope="module")
def engine():
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(8,),
                               prefill_chunks=(32,), token_budget=40)
  return Engine(load_model_card("tiny"), preset, EngineConfig(widths=WIDTHS, width=1))


def workload(seed, n=16):
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(0, 512, size=int(k)).tolist() for k in rng.integers(1, 100, size=n)]
  params = [SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True)
            for m in rng.integers(5, 40, size=n)]
  return list(zip(prompts, params))


def run(engine, requests, on_step=None, max_steps=2000):
  tag = f"r{next(_ids)}"
  for i, (p, sp) in enumerate(requests):
    engine.add_request(f"{tag}-{i}", p, sp)
  for k in itertools.count(1):
    assert k < max_steps, "the workload did not finish"
    if not engine.has_unfinished():
      break
    engine.step()
    if on_step is not None:
      on_step(k)
  outs = [engine.request(f"{tag}-{i}") for i in range(len(requests))]
  for i in range(len(requests)):
    engine.release(f"{tag}-{i}")
  return [[s.output_ids for s in seqs] for seqs in outs]


@pytest.mark.parametrize("seed", [0, 1])
def test_random_forced_switches_keep_greedy_ids(engine, seed):
  engine.set_width(1)
  requests = workload(seed)
  reference = run(engine, requests)
  pointers = engine.weights.buffer_pointers()
  rng = random.Random(seed)
  strategies = itertools.cycle(["pause", "migrate", "recompute", "pause", "drain", "migrate"])
  before = len(engine.switches)

  def switch_now(k):
    if k % 2 == 0 and engine._pending is None:
      engine.switch(rng.choice(WIDTHS), next(strategies), reason="test")

  got = run(engine, requests, switch_now)
  assert got == reference
  assert engine.no_leaks()
  assert engine.weights.buffer_pointers() == pointers
  records = engine.switches[before:]
  assert {r.strategy for r in records} >= {"recompute", "pause", "drain", "migrate"}
  assert sum(r.migrated for r in records) > 0
  assert sum(r.recomputed for r in records) > 0 and sum(r.paused for r in records) > 0
  # every paused sequence either resumed in its own layout or was recomputed later
  assert sum(r.paused for r in records) == sum(r.resumed + r.abandoned for r in records)
  assert sum(r.resumed for r in records) > 0
  stats = engine.stats()
  assert stats["switches"] == len(engine.switches) and stats["running"] == 0
  assert sum(stats["switches_by_reason_strategy"].values()) == len(engine.switches)
  assert stats["sequences_paused"] >= sum(r.paused for r in records)
  assert stats["sequences_migrated"] >= sum(r.migrated for r in records) > 0
  assert stats["switch_cutover_ms_median"] is not None and stats["switch_cutover_ms_median"] < 50
  names = {Partition.uniform(8, w).name for w in WIDTHS}
  assert set(stats["seconds_per_partition"]) <= names and len(stats["seconds_per_partition"]) >= 2


def test_drain_admits_nothing_until_running_ones_finish(engine):
  engine.set_width(2)
  requests = workload(5, n=10)
  tag = f"d{next(_ids)}"
  for i, (p, sp) in enumerate(requests[:4]):
    engine.add_request(f"{tag}-{i}", p, sp)
  engine.step()
  running = {s.seq_id for g in engine.scheduler.running for s in g}
  assert running
  engine.switch(8, "drain", reason="test")
  for i, (p, sp) in enumerate(requests[4:], start=4):
    engine.add_request(f"{tag}-{i}", p, sp)
  while engine.width == 2:
    engine.step()
    now = {s.seq_id for g in engine.scheduler.running for s in g}
    assert now <= running                       # nothing new admitted while draining
  assert engine.switches[-1].strategy == "drain" and engine.width == 8
  while engine.has_unfinished():
    engine.step()
  assert all(engine.request(f"{tag}-{i}")[0].finished for i in range(len(requests)))
  assert engine.no_leaks()


def test_aborting_a_paused_request_frees_its_pages(engine):
  engine.set_width(4)
  (p, sp), = workload(7, n=1)
  engine.add_request("paused-one", p, dataclasses.replace(sp, max_tokens=30))
  for _ in range(3):
    engine.step()
  seq, = engine.request("paused-one")
  assert seq.pages
  engine.switch(1, "pause")
  assert seq.status is Status.PAUSED and seq.pages
  assert not engine.pool.all_free()
  engine.abort("paused-one")
  assert seq.finish_reason == "abort" and engine.no_leaks()


def test_switch_to_unknown_width_or_strategy_is_refused(engine):
  with pytest.raises(ValueError, match="width 3"):
    engine.switch(3)
  with pytest.raises(ValueError):
    engine.switch(2, "teleport")


def test_log_likelihoods_of_the_greedy_path_survive_switches(engine):
  """Log-probabilities of every chosen token match a run without switches (1e-5 relative)."""
  engine.set_width(2)
  requests = [(p, dataclasses.replace(sp, logprobs=0)) for p, sp in workload(9, n=8)]
  tag = f"ll{next(_ids)}"

  def go(name, on_step=None):
    for i, (p, sp) in enumerate(requests):
      engine.add_request(f"{name}-{i}", p, sp)
    k = 0
    while engine.has_unfinished():
      engine.step()
      k += 1
      if on_step:
        on_step(k)
    out = []
    for i in range(len(requests)):
      (seq,) = engine.request(f"{name}-{i}")
      engine.release(f"{name}-{i}")
      out.append((seq.output_ids, np.array([lp.logprob for lp in seq.logprobs])))
    return out

  ref = go(tag + "ref")
  plan = [(8, "migrate"), ("4+1x4", "migrate"), (1, "recompute"), ("2+2+4", "pause"),
          (4, "pause"), (1, "pause"), ("4+1x4", "recompute"), (2, "migrate")]
  got = go(tag + "sw", lambda k: engine.switch(*plan.pop(0)) if k % 2 == 0 and plan else None)
  assert not plan
  for (ids_a, lp_a), (ids_b, lp_b) in zip(ref, got):
    assert ids_a == ids_b and len(lp_a) == len(ids_a)
    np.testing.assert_allclose(lp_b, lp_a, rtol=1e-5, atol=1e-6)
  assert engine.no_leaks()


def test_the_latest_switch_supersedes_a_pending_drain(engine):
  """Drain to 8 waits for busy DP groups; a migrate to 2 replaces it at once; ids unchanged."""
  engine.set_width(1)
  requests = workload(11, n=8)
  reference = run(engine, requests)
  before = engine.superseded_drains

  def decide(k):
    if k == 2:
      engine.switch(8, "drain", reason="test")
      assert engine.pending_switch is not None and engine.partition.name == "1x8"
      assert engine.stats()["pending_partition"] == "8"
    if k == 3:
      engine.switch(2, "migrate", reason="test")
      assert engine.pending_switch is None and engine.partition.name == "2x4"
      assert not engine.scheduler.closed

  assert run(engine, requests, decide) == reference
  assert engine.superseded_drains == before + 1 and engine.partition.name == "2x4"
  assert engine.no_leaks()


def test_a_refused_pin_changes_nothing(engine):
  engine.set_width(1)
  engine.set_policy(None)
  for target, strategy in [(2, "teleport"), (3, "drain"), ("1x2+3", "migrate")]:
    with pytest.raises(ValueError):
      engine.pin(target, strategy)
    assert engine.policy.name == "none" and engine.partition.name == "1x8"
  assert engine.pin(2, "recompute").name == "2x4" and engine.policy.width == 2
  engine.set_policy(None)


def test_paused_sequences_wait_at_most_max_pause_s_under_a_pin(engine):
  """Pinned away from their layout with pause while new work keeps the engine busy, paused
  sequences are recomputed after max_pause_s (no policy brings their layout back)."""
  engine.set_width(1)
  engine.set_policy(None)
  first, more = workload(12, n=6), workload(13, n=6)
  reference = run(engine, first + more)
  config = engine.config
  engine.config = dataclasses.replace(config, max_pause_s=0.05)
  expired = engine.pause_expired
  tag = f"mp{next(_ids)}"
  try:
    for i, (p, sp) in enumerate(first):
      engine.add_request(f"{tag}-{i}", p, sp)
    for _ in range(3):
      engine.step()
    engine.pin(8, "pause")
    assert len(engine.paused) > 0
    for i, (p, sp) in enumerate(more, start=len(first)):
      engine.add_request(f"{tag}-{i}", p, sp)
    while engine.has_unfinished():
      assert engine.scheduler.has_work(), "paused sequences left waiting with nothing to run"
      engine.step()
  finally:
    engine.config = config
    engine.set_policy(None)
  got = [[s.output_ids for s in engine.request(f"{tag}-{i}")] for i in range(len(reference))]
  assert got == reference
  assert engine.pause_expired > expired and engine.stats()["sequences_pause_expired"] > 0
  assert engine.no_leaks()
