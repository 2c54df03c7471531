"""Mixed partitions: a TP group beside DP replicas (tiny model, 8 simulated devices).

Invariants as for uniform switches: greedy ids equal a run without switches over any sequence of
uniform and mixed partitions and strategies; no page leak; weights and KV pools keep their
buffers; a partition that is not compiled is refused at configuration time.
"""

import dataclasses
import itertools
import random

import jax
import numpy as np
import pytest

from flying_jax.config import ConfigError, load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.policies import AutoPolicy, LoadPolicy, Observation, PriorityPolicy
from flying_jax.engine.sequence import Status
from flying_jax.engine.setup import EngineConfig
from flying_jax.parallel import Partition, PartitionError, Span
from flying_jax.sampling import SamplingParams

from test_switching import run, workload

MIXED = ("4+1x4", "2+2+4")
PARTITIONS = (1, 2, 4, 8) + MIXED


def preset(**kw):
  kw = {"partitions": MIXED, **kw}
  return dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(8,), prefill_chunks=(32,),
                             token_budget=40, **kw)


@pytest.fixture(scope="module")
def engine():
  return Engine(load_model_card("tiny"), preset(), EngineConfig(widths=(1, 2, 4, 8), width=1))


# ---------------------------------------------------------------- partitions as values
def test_partition_names_spans_and_errors():
  p = Partition.parse("4+1x4", 8)
  assert p.widths == (4, 1, 1, 1, 1) and p.name == "4+1x4" and p.uniform_width is None
  assert p.spans == (Span(0, 4, 4), Span(4, 4, 1))
  assert p.groups == ((0, 4), (4, 1), (5, 1), (6, 1), (7, 1))
  q = Partition.parse("2+2+4", 8)
  assert q.name == "2x2+4" and q.spans == (Span(0, 4, 2), Span(4, 4, 4))
  assert Partition.parse(8, 8).name == "8" and Partition.parse("1x8", 8) == Partition.uniform(8, 1)
  assert Partition.parse("4+4", 8) == Partition.uniform(8, 4) and Partition.uniform(8, 4).name == "4x2"
  for bad, match in [("1+4+1+1+1", "aligned"), ("4+1x3", "cover 7"), ("3+1x5", "power of two"),
                     ("4+y", "cannot read"), ("2x5", "cover 10")]:
    with pytest.raises(PartitionError, match=match):
      Partition.parse(bad, 8)


def test_preset_and_configuration_refuse_partitions_that_are_not_compiled():
  with pytest.raises(ConfigError, match="widths outside"):
    dataclasses.replace(load_mesh_preset("cpu-8"), widths=(1, 4), partitions=("2+2+4",))
  with pytest.raises(ConfigError, match="aligned"):
    dataclasses.replace(load_mesh_preset("cpu-8"), partitions=("1+4+1+1+1",))
  card = load_model_card("tiny")
  for config, policy, match in [
      (EngineConfig(widths=(1, 4), partitions=("2+2+4",)), None, "needs widths \\[2\\]"),
      (EngineConfig(widths=(1, 2, 4), partitions=("2+1x6",)), None, "does not allow"),
      (EngineConfig(widths=(1, 4), partitions=()), "static:4+1x4", "not compiled"),
      (EngineConfig(widths=(1, 4), partitions=(), width="2+2+4"), None, "not compiled")]:
    with pytest.raises(ValueError, match=match):    # before any weight is loaded or compiled
      Engine(card, preset(), config, policy=policy)


# ---------------------------------------------------------------- on the engine
def test_mixed_programs_are_compiled_per_span(engine):
  spans = {k[0] for k in engine.registry.keys()}
  assert spans == {Span(0, 8, w) for w in (1, 2, 4, 8)} | {Span(0, 4, 4), Span(4, 4, 1),
                                                            Span(0, 4, 2), Span(4, 4, 4)}
  assert set(engine.partitions) == {"1x8", "2x4", "4x2", "8", "4+1x4", "2x2+4"}
  assert any("mixed partitions: 4+1x4, 2x2+4" in line for line in engine.report.lines())


def test_switching_to_a_partition_not_compiled_is_refused(engine):
  with pytest.raises(ValueError, match="not compiled"):
    engine.switch("4+2+1+1")
  with pytest.raises(ValueError, match="cover"):
    engine.switch("4+1")
  assert engine.no_leaks()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_switches_over_uniform_and_mixed_partitions_keep_greedy_ids(engine, seed):
  engine.set_width(1)
  requests = workload(seed, n=20)
  reference = run(engine, requests)
  weights = engine.weights.buffer_pointers()
  pools = _pool_pointers(engine)
  rng = random.Random(seed)
  strategies = itertools.cycle(["migrate", "pause", "recompute", "migrate", "pause", "recompute",
                                "drain"])
  targets = itertools.cycle(rng.sample(PARTITIONS, len(PARTITIONS)))   # every one visited
  before = len(engine.switches)
  seen = set()

  def switch_now(k):
    if k % 2 == 0 and engine._pending is None:
      target = next(targets)
      engine.switch(target, next(strategies), reason="test")
      seen.add(str(target))

  got = run(engine, requests, switch_now)
  assert got == reference
  assert engine.no_leaks()
  records = engine.switches[before:]
  assert seen >= set(MIXED) and sum(r.migrated for r in records) > 0
  assert sum(r.paused for r in records) == sum(r.resumed + r.abandoned for r in records) + \
      len(engine.paused)
  engine.set_width(1)
  assert engine.weights.buffer_pointers() == weights
  assert _pool_pointers(engine) == pools           # the KV pools are the same buffers again
  assert engine.stats()["partition"] == "1x8"


@pytest.mark.parametrize("overlap", [True, False])
def test_spans_step_independently(engine, overlap):
  """In 4+1x4 the TP4 span prefills a long prompt while the DP span decodes: the engine never
  waits for the busy span. Each TP4 step is held "not done" until the DP span has completed three
  steps after its launch (ordering and counts, not speed: the engine must keep stepping the DP
  span meanwhile); greedy ids equal a uniform run's; no page leaks."""
  engine.set_width(1)
  rng = np.random.default_rng(5)
  decode = [(rng.integers(0, 512, size=12).tolist(),
             SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)) for _ in range(4)]
  long_prompt = rng.integers(0, 512, size=150).tolist()      # five 32-token chunks
  urgent = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
  reference = run(engine, decode + [(long_prompt, urgent)])
  engine.set_width("4+1x4")
  engine.overlap = overlap
  tp, dp = Span(0, 4, 4), Span(4, 4, 1)
  log = []                                           # ("launch" | "collect", span), in order
  ex = engine.executor
  launch, collect, ready = ex.launch, ex.collect, ex.ready

  def logged_launch(spans, work, banned_for, prev=None):
    out = launch(spans, work, banned_for, prev)
    log.append(("launch", spans[0].span, id(out)))
    return out

  def logged_collect(launched):
    log.append(("collect", launched.spans[0].span, id(launched)))
    return collect(launched)

  def gated_ready(launched):
    if launched.spans[0].span == tp and engine._inflight[1]:
      at = next(i for i, e in enumerate(log) if e[2] == id(launched))
      if sum(e[:2] == ("collect", dp) for e in log[at:]) < 3:
        return False
    return ready(launched)

  ex.launch, ex.collect, ex.ready = logged_launch, logged_collect, gated_ready
  try:
    tag = f"ind{overlap}"
    for i, (p, sp) in enumerate(decode):
      engine.add_request(f"{tag}-{i}", p, sp)
    for _ in range(2):                               # the DP replicas are decoding
      engine.step()
    engine.add_request(f"{tag}-long", long_prompt, urgent, priority=1)   # to the TP4 group
    for k in itertools.count():
      assert k < 500, "the workload did not finish"
      if not engine.has_unfinished():
        break
      engine.step()
  finally:
    del ex.launch, ex.collect, ex.ready
  got = [[s.output_ids for s in engine.request(f"{tag}-{i}")] for i in range(len(decode))]
  got.append([s.output_ids for s in engine.request(f"{tag}-long")])
  assert got == reference
  for rid in [f"{tag}-{i}" for i in range(len(decode))] + [f"{tag}-long"]:
    engine.release(rid)
  assert engine.no_leaks()
  engine.overlap = True
  # every TP4 step launched while the DP span still decoded saw three DP steps complete first
  tp_steps = [e[2] for e in log if e[:2] == ("launch", tp)]
  assert len(tp_steps) >= 5                          # five prefill chunks, then decode steps
  overlapped = 0
  for step in tp_steps:
    at = next(i for i, e in enumerate(log) if e[2] == step and e[0] == "launch")
    end = next(i for i, e in enumerate(log) if e[2] == step and e[0] == "collect")
    overlapped += sum(e[:2] == ("collect", dp) for e in log[at:end]) >= 3
  assert overlapped >= 4
  engine.set_width(1)


def test_mixed_partition_serves_priority_in_its_tp_group(engine):
  engine.set_width("4+1x4")
  assert engine.width is None and engine.partition.name == "4+1x4"
  (p, sp), = workload(3, n=1)
  normal = [engine.add_request(f"mx-n{i}", p, sp)[0] for i in range(6)]
  urgent = engine.add_request("mx-u", p, sp, priority=1)[0]
  engine.step()
  groups = engine.scheduler.groups
  assert groups[urgent.group].width == 4 and urgent.first_device == 0
  assert all(groups[s.group].width == 1 for s in normal if s.status is Status.RUNNING)
  assert all(s.status is Status.RUNNING for s in normal[:4])   # one per DP replica at least
  while engine.has_unfinished():
    engine.step()
  for rid in [f"mx-n{i}" for i in range(6)] + ["mx-u"]:
    engine.release(rid)
  assert engine.no_leaks()
  engine.set_width(1)


def test_switching_into_a_mixed_partition_keeps_the_groups_it_shares(engine):
  engine.set_width(1)
  requests = workload(4, n=8)
  tag = "keep"
  for i, (p, sp) in enumerate(requests):
    engine.add_request(f"{tag}-{i}", p, dataclasses.replace(sp, max_tokens=40))
  for _ in range(3):
    engine.step()
  on_right = {s.seq_id: (s.first_device, list(s.pages)) for g in engine.scheduler.running
              for s in g if s.first_device >= 4}
  assert on_right
  record = engine.switch("4+1x4", "pause")
  assert record.kept == len(on_right) and record.paused > 0
  now = {s.seq_id: (s.first_device, list(s.pages)) for g in engine.scheduler.running for s in g}
  assert {k: now[k] for k in on_right} == on_right        # same devices, same pages, no copy
  engine.switch(1, "pause")                               # the paused ones resume
  while engine.has_unfinished():
    engine.step()
  for i in range(len(requests)):
    engine.release(f"{tag}-{i}")
  assert engine.no_leaks() and not len(engine.paused)


def test_priority_policy_uses_a_mixed_partition_when_busy_and_returns():
  p = PriorityPolicy()
  base = dict(width=1, widths=(1, 2, 4, 8), capacity={1: 192, 2: 384, 4: 768, 8: 1536},
              waiting=0, running=6, paused=0, paused_widths=(), waiting_max_length=0,
              max_priority=1, oldest_wait_s=0.0, kv_usage=0.0, step=0, partition="1x8",
              widest=1, mixed={"4+1x4": 4}, priority_inflight=1, max_priority_unstarted=1)
  d = p.decide(Observation(**base))
  assert (d.partition, d.strategy, d.reason) == ("4+1x4", "migrate", "priority")
  quiet = p.decide(Observation(**{**base, "running": 1}))      # nothing else: all of TP
  assert (quiet.partition, quiet.strategy) == (8, "pause")
  done = p.decide(Observation(**{**base, "width": None, "partition": "4+1x4", "widest": 4,
                                 "max_priority": 0, "priority_inflight": 0,
                                 "max_priority_unstarted": 0}))
  assert (done.partition, done.reason) == (1, "priority:done")
  starving = p.decide(Observation(**{**base, "width": 8, "partition": "8", "paused": 3,
                                     "paused_widths": (1,), "oldest_paused_s": 11.0}))
  assert (starving.partition, starving.strategy) == ("8", "recompute")


def test_paused_sequences_are_not_starved_by_an_endless_priority_stream():
  """Priority requests keep arriving; the paused DP sequences still finish (recomputed in TP)."""
  engine = Engine(load_model_card("tiny"), preset(partitions=()),
                  EngineConfig(widths=(1, 8), width=1, partitions=()),
                  policy=AutoPolicy(priority=PriorityPolicy(max_pause_s=0.3),
                                    load=LoadPolicy(high=10**6, low=-1, max_wait_s=1e9),
                                    leave=float("inf")))
  # (the pause bound, not the predictions: auto would otherwise leave TP8 on what the tiny
  # model's CPU steps predict, tests/test_demand.py)
  (p, sp), = workload(6, n=1)
  slow = dataclasses.replace(sp, max_tokens=30)
  for i in range(8):
    engine.add_request(f"bg-{i}", p, slow)
  for _ in range(2):
    engine.step()
  k = 0
  while not all(engine.request(f"bg-{i}")[0].finished for i in range(8)):
    assert k < 400, "paused sequences starved"
    if k % 3 == 0:                                    # a latency-critical request every 3 steps
      engine.add_request(f"hot-{k}", p, dataclasses.replace(sp, max_tokens=4), priority=1)
    engine.step()
    k += 1
  reasons = {r.reason for r in engine.switches}
  assert "priority" in reasons and "priority:paused-too-long" in reasons
  while engine.has_unfinished():
    engine.step()
  assert engine.no_leaks()


def test_memory_policy_picks_a_mixed_partition_when_others_run():
  """A request too long for a DP group arrives while DP work runs: a TP4 group takes it."""
  engine = Engine(load_model_card("tiny"), preset(partitions=("4+1x4",)),
                  EngineConfig(widths=(1, 4), width=1, pages_per_device=4),
                  policy=AutoPolicy(load=LoadPolicy(high=10**6, low=-1, max_wait_s=1e9)))
  requests = [(p, dataclasses.replace(sp, max_tokens=30)) for p, sp in workload(8, n=6)
              if len(p) + 30 <= engine.setups[1].capacity]
  for i, (p, sp) in enumerate(requests):
    engine.add_request(f"mem-{i}", p, sp)
  engine.step()
  cap1 = engine.setups[1].capacity
  long_prompt = np.random.default_rng(0).integers(0, 512, size=cap1 + 10).tolist()
  engine.add_request("mem-long", long_prompt, SamplingParams(temperature=0, max_tokens=8,
                                                             ignore_eos=True))
  while engine.has_unfinished():
    engine.step()
  assert engine.request("mem-long")[0].finish_reason == "length"
  assert any(r.reason == "memory" and r.to_width == "4+1x4" for r in engine.switches)
  assert all(engine.request(f"mem-{i}")[0].finish_reason == "length" for i in range(len(requests)))
  assert engine.no_leaks()


def _pool_pointers(engine):
  return [s.data.unsafe_buffer_pointer() for a in engine.device_pools.k + engine.device_pools.v
          for s in a.addressable_shards]
