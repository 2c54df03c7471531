"""Overlap: the engine launches step n+1 before it reads step n's sampled ids.

Decode slots then take their token from the previous step on the device (`StepMeta.feed`). One
engine serves every test and toggles `engine.overlap`: whatever the workload (greedy and seeded
random sampling, logprobs, penalties, stop ids hit while the next step is in flight, length
limits, preemption for want of pages, aborts, switches), the ids are the same with and without
overlap, nothing leaks, and most steps really were launched behind one in flight.
"""

import dataclasses
import itertools

import numpy as np
import pytest

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig
from flying_jax.sampling import SamplingParams
from flying_jax.tokenizers import load_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
_ids = itertools.count()


@pytest.fixture(scope="module")
def engine():
  card = load_model_card("tiny")
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(8,),
                               prefill_chunks=(32,), token_budget=40)
  # 4 pages of 64 tokens per device: at width 1 a group holds 192 tokens, so two of the long
  # requests below in one group preempt
  return Engine(card, preset, EngineConfig(widths=(1, 2), pages_per_device=4),
                tokenizer=load_tokenizer(card))


@pytest.fixture
def launches(engine):
  """Counts [steps launched, of which behind a step still in flight]."""
  counts = [0, 0]
  original = engine.executor.launch

  def counted(spans, work, banned_for, prev=None):
    counts[0] += 1
    counts[1] += prev is not None
    return original(spans, work, banned_for, prev)

  engine.executor.launch = counted
  yield counts
  del engine.executor.launch


def serve(engine, reqs, overlap: bool, on_step=None):
  """Serve (prompt, params) pairs to the end; the sequences, released."""
  engine.overlap = overlap
  tag = f"o{next(_ids)}"
  seqs = [engine.add_request(f"{tag}-{i}", p, sp) for i, (p, sp) in enumerate(reqs)]
  for k in itertools.count():
    assert k < 3000, "the workload did not finish"
    if not engine.has_unfinished():
      break
    engine.step()
    if on_step is not None:
      on_step(k)
  for i in range(len(reqs)):
    engine.release(f"{tag}-{i}")
  assert engine.no_leaks()
  engine.overlap = True
  return [[s for s in ss] for ss in seqs]


def prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 512, size=int(n)).tolist() for n in lengths]


def outputs(seqs):
  return [[(s.output_ids, s.finish_reason) for s in ss] for ss in seqs]


def test_overlap_gives_the_same_ids_as_stepping_one_at_a_time(engine, launches):
  engine.set_width(2)
  rng = np.random.default_rng(0)
  params = [
      GREEDY,
      dataclasses.replace(GREEDY, max_tokens=5),
      SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True),
      SamplingParams(temperature=0.7, top_k=20, seed=3, max_tokens=16, n=2, ignore_eos=True),
      dataclasses.replace(GREEDY, logprobs=3, max_tokens=12),
      dataclasses.replace(GREEDY, repetition_penalty=1.3, presence_penalty=0.4, max_tokens=18),
      SamplingParams(temperature=0.0, max_tokens=30, min_tokens=4),
  ]
  reqs = [(p, params[i % len(params)])
          for i, p in enumerate(prompts(1, rng.integers(1, 90, size=14)))]
  ref = serve(engine, reqs, overlap=False)
  assert launches[1] == 0
  first = launches[0]
  got = serve(engine, reqs, overlap=True)
  assert outputs(got) == outputs(ref)
  for a, b in zip(itertools.chain(*got), itertools.chain(*ref)):
    assert [t.token_id for t in a.logprobs] == [t.token_id for t in b.logprobs]
    np.testing.assert_allclose([t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs],
                               rtol=1e-5, atol=1e-5)
  assert launches[1] > 0      # (a row with penalties has every step collected before the next)


def test_stops_found_while_the_next_step_runs(engine, launches):
  """A stop id sampled in step n ends the sequence though step n+1 already decodes it: that
  step's token is dropped, its pages go back, and the output ends at the stop."""
  engine.set_width(1)
  ps = prompts(2, [5, 33, 70, 12])
  ref = serve(engine, [(p, GREEDY) for p in ps], overlap=False)
  reqs = []
  for p, (seq,) in zip(ps, ref):
    k = 3 + len(reqs)
    reqs.append((p, dataclasses.replace(GREEDY, stop_token_ids=[seq.output_ids[k]],
                                         ignore_eos=False)))
  first = launches[0]
  got = serve(engine, reqs, overlap=True)
  assert launches[1] >= 0.7 * (launches[0] - first)    # most steps followed one in flight
  for (seq,), (r,) in zip(got, ref):
    first = r.output_ids.index(seq.stop_reason)
    assert seq.finish_reason == "stop" and seq.output_ids == r.output_ids[:first + 1]
  assert outputs(got) == outputs(serve(engine, reqs, overlap=False))


def test_preemption_and_abort_under_overlap(engine, launches):
  """Sequences preempted for want of pages while their token is on the device, and a request
  aborted between steps, leave the others' ids as without overlap; no page leaks."""
  engine.set_width(1)
  reqs = [(p, dataclasses.replace(GREEDY, max_tokens=40))
          for p in prompts(3, [60, 80, 50, 70] * 4)]
  before = engine.scheduler.preempted_total
  ref = serve(engine, reqs, overlap=False)
  assert engine.scheduler.preempted_total > before            # the pool is too small for all
  before = engine.scheduler.preempted_total
  got = serve(engine, reqs, overlap=True)
  assert engine.scheduler.preempted_total > before
  assert outputs(got) == outputs(ref)
  assert launches[1] > 0

  tag = f"ab{next(_ids)}"
  kept = [engine.add_request(f"{tag}-{i}", p, sp)[0] for i, (p, sp) in enumerate(reqs[:6])]
  for _ in range(4):
    engine.step()
  assert kept[2].pending                      # its token of the step in flight is on the device
  assert engine.abort(f"{tag}-2")
  while engine.has_unfinished():
    engine.step()
  for i in range(6):
    engine.release(f"{tag}-{i}")
  assert engine.no_leaks()
  assert kept[2].finish_reason == "abort"
  assert [s.output_ids for i, s in enumerate(kept) if i != 2] == \
         [ss[0].output_ids for i, ss in enumerate(ref[:6]) if i != 2]


def test_switches_collect_the_step_in_flight(engine):
  """Switching (migrate, recompute, pause) collects the step in flight first; greedy ids equal
  those of a run without overlap or switches."""
  engine.set_width(1)
  reqs = [(p, GREEDY) for p in prompts(4, [9, 40, 25, 61, 3, 17])]
  ref = serve(engine, reqs, overlap=False)
  plan = {3: (2, "migrate"), 8: (1, "recompute"), 12: (2, "pause"), 16: (1, "migrate")}
  got = serve(engine, reqs, overlap=True,
              on_step=lambda k: engine.switch(*plan[k], reason="test") if k in plan else None)
  assert len(engine.switches) >= 4
  assert outputs(got) == outputs(ref)


def test_stream_items_read_each_event_as_of_that_event(engine):
  """A call may hand out several events of one sequence (a span's queue holds two steps, a switch
  collects first), and the server turns them into stream items after the last one: each item
  must say what its own event did (finish reason on the last only, its own logprobs and count),
  not the sequence's state by then."""
  from flying_jax.serving.loop import _item

  engine.set_width(1)
  params = dataclasses.replace(GREEDY, max_tokens=6, logprobs=2)
  seq, = engine.add_request("items-0", prompts(9, [20])[0], params)
  events = []
  while engine.has_unfinished():
    events += [ev for ev in engine.step() if ev.seq is seq]
  items = [_item(ev, 0.0) for ev in events]            # all delivered after the finish
  assert [it.finish_reason for it in items] == [None] * 5 + ["length"]
  assert [it.token_ids for it in items] == [[t] for t in seq.output_ids]
  assert [it.logprobs for it in items] == [[lp] for lp in seq.logprobs]
  assert [it.completion_tokens for it in items] == list(range(1, 7))
  engine.release("items-0")
  assert engine.no_leaks()
