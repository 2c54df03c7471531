"""The engine end to end on the tiny random model over 8 simulated CPU devices.

One engine compiled for every width (1, 2, 4, 8) serves most tests, switching width between
workloads with `Engine.set_width`; one more engine with a tiny KV pool forces waiting and
preemption. Every workload ends with `no_leaks()`.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine, RequestRejected
from flying_jax.engine.setup import EngineConfig
from flying_jax.model.batch import StepShape
from flying_jax.runtime.programs import MissingProgram
from flying_jax.sampling import SamplingParams
from flying_jax.tokenizers import load_tokenizer
from helpers import captured_logits

WIDTHS = (1, 2, 4, 8)
VOCAB = 512
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def small_preset():
  """cpu-8 with one decode bucket and one prefill chunk, to keep compile time down."""
  return dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(8,), prefill_chunks=(32,),
                             token_budget=40)


@pytest.fixture(scope="module")
def card():
  return load_model_card("tiny")


@pytest.fixture(scope="module")
def engine(card):
  return Engine(card, small_preset(), EngineConfig(widths=WIDTHS), tokenizer=load_tokenizer(card))


@pytest.fixture(scope="module")
def small_pool_engine(card):
  """Width 1 with 6 pages per device: 5 usable pages (80 tokens per group with 16-token pages)."""
  return Engine(card, small_preset(), EngineConfig(widths=(1,), pages_per_device=6),
                tokenizer=load_tokenizer(card))


_rids = itertools.count()


def prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, size=n).tolist() for n in lengths]


def run(engine, requests, width=None, watch=None):
  """Add every (prompt_ids, params) at once and step until all finish; each request's sequences.

  `watch`, a list, receives (waiting, running) after every step.
  """
  if width is not None:
    engine.set_width(width)
  rids = []
  for prompt, params in requests:
    rids.append(f"req-{next(_rids)}")
    engine.add_request(rids[-1], prompt, params)
  for _ in range(100_000):
    if not engine.has_unfinished():
      break
    engine.step()
    if watch is not None:
      watch.append((len(engine.scheduler.waiting), engine.scheduler.num_running()))
  out = [engine.request(r) for r in rids]
  for r in rids:
    engine.release(r)
  assert all(s.finished for seqs in out for s in seqs)
  assert engine.no_leaks()
  return out


def ids(out):
  """Output ids of the first sample of each request."""
  return [seqs[0].output_ids for seqs in out]


# ---------------------------------------------------------------- widths agree

def test_greedy_ids_and_logits_agree_across_widths(engine):
  """Prompts crossing pages (16 tokens at width 1), chunks (32) and attention blocks."""
  reqs = [(p, GREEDY) for p in prompts(0, [1, 7, 40, 130])]
  results = {}
  for w in WIDTHS:
    with captured_logits(engine) as got:
      out = run(engine, reqs, width=w)
    results[w] = [(s.output_ids, np.stack(got[s.seq_id])) for s in (seqs[0] for seqs in out)]
    for toks, logits in results[w]:
      assert len(toks) == GREEDY.max_tokens and logits.shape == (len(toks), VOCAB)
      assert logits.argmax(-1).tolist() == toks          # the sampled row is the logged row
  for w in WIDTHS[1:]:
    for (ref_ids, ref), (toks, logits) in zip(results[1], results[w]):
      assert toks == ref_ids, f"width {w}"
      np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                 err_msg=f"width {w}")


# ---------------------------------------------------------------- batching

def test_continuous_batching_equals_one_at_a_time(engine):
  """32 requests of mixed lengths at width 4 (2 groups x 8 decode slots, so half of them wait)."""
  rng = np.random.default_rng(1)
  lengths = [1, 300] + rng.integers(1, 301, size=30).tolist()
  reqs = [(p, SamplingParams(temperature=0.0, max_tokens=int(rng.integers(1, 17))))
          for p in prompts(2, lengths)]
  watch = []
  s0 = engine.steps
  together = run(engine, reqs, width=4, watch=watch)
  batched_steps, s1 = engine.steps - s0, engine.steps
  alone = [run(engine, [r], width=4)[0] for r in reqs]
  alone_steps = engine.steps - s1
  assert ids(together) == ids(alone)
  for (_, params), seqs in zip(reqs, together):
    assert len(seqs[0].output_ids) == params.max_tokens and seqs[0].finish_reason == "length"
  assert max(w for w, _ in watch) > 0                     # some requests had to wait
  slots = len(engine.scheduler.groups) * max(engine.preset.decode_buckets)
  assert max(r for _, r in watch) == slots                # every decode slot was used
  assert batched_steps * 2 < alone_steps, (batched_steps, alone_steps)


# ---------------------------------------------------------------- sampling

def test_same_seed_same_tokens_different_seed_differs(engine):
  prompt = prompts(3, [20])[0]
  p = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=16)
  other = dataclasses.replace(p, seed=99)
  alone = ids(run(engine, [(prompt, p)], width=2))[0]
  mixed = ids(run(engine, [(prompt, p)] + [(q, GREEDY) for q in prompts(4, [5, 50, 9])]
                  + [(prompt, p), (prompt, other)], width=2))
  assert mixed[0] == alone and mixed[4] == alone         # batch position does not matter
  assert mixed[5] != alone
  assert len(alone) == 16 and all(0 <= t < VOCAB for t in alone)
  greedy = ids(run(engine, [(prompt, dataclasses.replace(p, temperature=0.0))], width=2))[0]
  assert greedy != alone


def test_n_samples(engine):
  prompt = prompts(5, [11])[0]
  p = SamplingParams(n=3, temperature=0.8, top_p=0.9, seed=7, max_tokens=12)
  (seqs,) = run(engine, [(prompt, p)], width=2)
  assert [s.index for s in seqs] == [0, 1, 2]
  assert all(len(s.output_ids) == 12 and s.finish_reason == "length" for s in seqs)
  assert len({tuple(s.output_ids) for s in seqs}) > 1
  (again,) = run(engine, [(prompt, p)], width=2)
  assert [s.output_ids for s in again] == [s.output_ids for s in seqs]


# ---------------------------------------------------------------- stops and limits

def test_stop_token_ids_min_tokens_and_max_tokens(engine):
  prompt = prompts(6, [9])[0]
  ref = ids(run(engine, [(prompt, dataclasses.replace(GREEDY, max_tokens=16))], width=1))[0]
  k = next(i for i in range(2, 16) if ref[i] not in ref[:i])
  stop = dict(stop_token_ids=[ref[k]])
  out = run(engine, [
      (prompt, dataclasses.replace(GREEDY, max_tokens=16, **stop)),
      (prompt, dataclasses.replace(GREEDY, max_tokens=5)),
      (prompt, dataclasses.replace(GREEDY, max_tokens=16, stop_token_ids=[ref[0]])),
      (prompt, dataclasses.replace(GREEDY, max_tokens=16, min_tokens=k + 1, **stop)),
  ], width=1)
  s_stop, s_len, s_first, s_min = (seqs[0] for seqs in out)
  assert s_stop.output_ids == ref[:k + 1]
  assert (s_stop.finish_reason, s_stop.stop_reason) == ("stop", ref[k])
  assert s_len.output_ids == ref[:5] and s_len.finish_reason == "length"
  assert s_first.output_ids == ref[:1] and s_first.finish_reason == "stop"
  # below min_tokens the stop id is banned: the same prefix, then another token at k
  assert s_min.output_ids[:k] == ref[:k] and s_min.output_ids[k] != ref[k]
  assert ref[k] not in s_min.output_ids[:k + 1] and len(s_min.output_ids) >= k + 1
  if s_min.finish_reason == "stop":
    assert s_min.output_ids[-1] == ref[k]
  else:
    assert s_min.finish_reason == "length" and len(s_min.output_ids) == 16


def _printable(t):
  return 32 <= t < 127


def test_stop_strings(engine):
  """Byte tokenizer: ids < 128 are ASCII characters, so stop strings can be aimed at known tokens."""
  texts = ["hello", "the sky", "abc", "0123", "print(", "Once upon", "x = 1", "fn main"]
  params = dataclasses.replace(GREEDY, max_tokens=24)
  refs = [seqs[0] for seqs in run(engine, [(list(t.encode()), params) for t in texts], width=8)]
  # the first prompt whose greedy output has two printable ASCII tokens in a row
  i, j = next((i, j) for i, r in enumerate(refs) for j in range(23)
              if _printable(r.output_ids[j]) and _printable(r.output_ids[j + 1]))
  ref = refs[i]
  first = next(n for n, t in enumerate(ref.output_ids) if _printable(t))
  one = chr(ref.output_ids[first])
  two = chr(ref.output_ids[j]) + chr(ref.output_ids[j + 1])   # straddles two tokens
  prompt = list(texts[i].encode())
  out = run(engine, [
      (prompt, dataclasses.replace(params, stop=[one])),
      (prompt, dataclasses.replace(params, stop=[one], include_stop_str_in_output=True)),
      (prompt, dataclasses.replace(params, stop=[two])),
      (prompt, dataclasses.replace(params, stop=["\x00\x01\x02 never"])),
  ], width=8)
  s_one, s_incl, s_two, s_none = (seqs[0] for seqs in out)
  assert s_one.output_ids == ref.output_ids[:first + 1]
  assert (s_one.finish_reason, s_one.stop_reason) == ("stop", one)
  assert one not in s_one.text and ref.text.startswith(s_one.text + one)
  assert s_incl.text == s_one.text + one
  stop_at = ref.text.find(two)
  assert 0 <= stop_at and s_two.text == ref.text[:stop_at]
  assert len(s_two.output_ids) <= j + 2 and s_two.finish_reason == "stop"
  assert s_two.output_ids == ref.output_ids[:len(s_two.output_ids)]
  assert s_none.output_ids == ref.output_ids and s_none.text == ref.text
  assert s_none.finish_reason == "length"


# ---------------------------------------------------------------- refusals and aborts

def test_refused_requests_leave_the_engine_working(engine):
  engine.set_width(1)
  prompt = prompts(7, [12])[0]
  (before,) = ids(run(engine, [(prompt, GREEDY)]))
  cases = [
      ([], GREEDY, "empty"),
      ([1, VOCAB], GREEDY, "outside the vocabulary"),
      ([-1, 3], GREEDY, "outside the vocabulary"),
      (prompt, dataclasses.replace(GREEDY, max_tokens=engine.capacity - len(prompt) + 1), "exceeds"),
      (prompt, {"temperature": 0.0}, "SamplingParams"),
  ]
  for bad_prompt, params, match in cases:
    with pytest.raises(RequestRejected, match=match):
      engine.add_request("bad", bad_prompt, params)
    assert engine.no_leaks()
  with pytest.raises(ValueError, match="temperature"):
    SamplingParams(temperature=-1.0)
  # exactly at capacity is accepted (then aborted before it runs)
  engine.add_request("full", prompt, dataclasses.replace(GREEDY, max_tokens=engine.capacity - 12))
  assert engine.abort("full") and engine.no_leaks()
  # a duplicate id is refused while the first request is known
  engine.add_request("dup", prompt, GREEDY)
  with pytest.raises(RequestRejected, match="already in use"):
    engine.add_request("dup", prompts(8, [3])[0], GREEDY)
  with pytest.raises(RuntimeError, match="running or waiting"):
    engine.set_width(2)
  with pytest.raises(ValueError, match="does not divide"):
    engine.set_width(3)
  while engine.has_unfinished():
    engine.step()
  assert engine.request("dup")[0].output_ids == before
  engine.release("dup")
  assert engine.no_leaks()
  assert ids(run(engine, [(prompt, GREEDY)])) == [before]


def test_abort_mid_generation_frees_pages(engine):
  a, b = prompts(9, [40, 20])
  long = dataclasses.replace(GREEDY, max_tokens=40)
  (ref_b,) = ids(run(engine, [(b, GREEDY)], width=2))
  engine.add_request("abort-a", a, long)
  engine.add_request("abort-n", b, SamplingParams(n=3, temperature=0.8, max_tokens=40))
  engine.add_request("keep-b", b, GREEDY)
  engine.add_request("abort-waiting", a, long)
  assert engine.abort("abort-waiting")                    # never scheduled
  while len(engine.request("abort-a")[0].output_ids) < 3:
    engine.step()
  held = [s for r in ("abort-a", "abort-n") for s in engine.request(r)]
  assert all(s.pages for s in held) and engine.kv_usage() > 0
  assert engine.abort("abort-a") and engine.abort("abort-n")
  assert all(s.finished and s.finish_reason == "abort" and not s.pages for s in held)
  assert not engine.abort("abort-a") and not engine.abort("never-added")
  while engine.has_unfinished():
    engine.step()
  assert engine.request("keep-b")[0].output_ids == ref_b
  engine.release("keep-b")
  assert engine.no_leaks() and engine.kv_usage() == 0


def test_small_pool_waits_and_preempts_yet_matches(small_pool_engine, engine):
  cap = small_pool_engine.capacity
  assert cap == 5 * small_pool_engine.preset.page_tokens     # 5 usable pages, width 1
  rng = np.random.default_rng(10)
  lengths = rng.integers(cap // 10, cap // 2 + 1, size=24).tolist()
  reqs = [(p, SamplingParams(temperature=0.0,
                             max_tokens=int(rng.integers(cap // 4, cap - len(p) + 1))))
          for p in prompts(11, lengths)]
  watch = []
  constrained = run(small_pool_engine, reqs, watch=watch)
  free = run(engine, reqs, width=1)
  assert ids(constrained) == ids(free)
  assert small_pool_engine.scheduler.preempted_total > 0
  assert any(s.preemptions for seqs in constrained for s in seqs)
  assert any(w > 0 and r > 0 for w, r in watch)           # requests waited while others ran
  for (_, params), seqs in zip(reqs, constrained):
    assert len(seqs[0].output_ids) == params.max_tokens


# ---------------------------------------------------------------- nothing compiles, nothing moves

def _mixed_workload():
  ps = prompts(12, [3, 33, 70, 17])
  return [(ps[0], GREEDY),
          (ps[1], SamplingParams(temperature=0.7, top_k=20, seed=1, max_tokens=6, logprobs=3)),
          (ps[2], SamplingParams(n=2, temperature=1.0, min_p=0.05, repetition_penalty=1.2,
                                 presence_penalty=0.5, frequency_penalty=0.3, max_tokens=7)),
          (ps[3], SamplingParams(temperature=0.0, max_tokens=8, min_tokens=4, stop=["a"],
                                 stop_token_ids=[5]))]


def test_nothing_compiles_on_the_request_path(engine):
  events = []

  def listener(name, duration, **kwargs):
    if "compile" in name:
      events.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0)).block_until_ready()     # a fresh compile
    assert "/jax/core/compile/backend_compile_duration" in events
    events.clear()
    for w in WIDTHS:
      out = run(engine, _mixed_workload(), width=w)
      lp = out[1][0]
      assert len(lp.logprobs) == len(lp.output_ids)
      assert all(len(t.top) == 3 and t.logprob <= 0 for t in lp.logprobs)
    assert events == []
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_missing_program_raises(engine):
  reg = engine.registry
  assert len(reg) == reg.count() == len(reg.stats)
  assert engine.report.programs == len(reg) + len(engine.migrator)   # + KV migration programs
  assert {k[1] for k in reg.keys()} == {"step", "sample"}      # a step, then its sampling
  some = next(k for k in reg.keys() if k[1] == "step")
  assert callable(reg[some])
  for key in [(3, "step", some[2]), (some[0], "step", StepShape(64, 0, some[2].max_pages)),
              (some[0], "layer", some[2]), (some[0], "sample", some[2])]:
    with pytest.raises(MissingProgram, match="no compiled program"):
      reg[key]
  assert issubclass(MissingProgram, KeyError)


def test_weights_stay_resident_across_widths(engine):
  before = engine.weights.buffer_pointers()
  # one pointer per shard (on CPU, jax may alias the shards of an aligned host array to one buffer)
  assert len(before) == len(jax.tree.leaves(engine.weights)) * len(engine.devices)
  for w in WIDTHS:
    run(engine, _mixed_workload()[:2], width=w)
  assert engine.weights.buffer_pointers() == before
  assert not any(x.is_deleted() for x in jax.tree.leaves(engine.weights))
  rep = engine.report
  assert rep.weight_bytes == engine.weights.nbytes() > 0 and rep.kv_bytes > 0
  assert [p["width"] for p in rep.padding] == list(WIDTHS)
  print(f"\n{'program':<42} {'args MiB':>9} {'temp MiB':>9} {'out MiB':>9} {'compile s':>9}")
  for st in sorted(engine.registry.stats, key=lambda s: (s.key[0], s.key[1], str(s.key[2]))):
    w, kind, shape = st.key
    name = f"w{w} {kind} " + ("" if shape is None else f"d{shape.decode} c{shape.chunk}")
    print(f"{name:<42} {st.argument_bytes / 2**20:9.3f} {st.temp_bytes / 2**20:9.3f} "
          f"{st.output_bytes / 2**20:9.3f} {st.compile_s:9.2f}")
    assert st.argument_bytes > 0 and st.output_bytes > 0 and st.compile_s > 0
    assert st.temp_bytes > 0
    if kind == "step":
      assert st.alias_bytes >= engine.device_pools.nbytes() // len(engine.devices)
      # ^ (one device's figures) its KV pools are donated: written in place, not copied


def test_several_prompts_prefill_side_by_side(card, engine):
  """With 4-row prefill shapes, short prompts are prefilled 4 per step; tokens are unchanged."""
  preset = dataclasses.replace(small_preset(), prefill_rows=(1, 4))
  multi = Engine(card, preset, EngineConfig(widths=(4,)), tokenizer=load_tokenizer(card))
  assert (4, 8) in multi.scheduler.limits.prefill_modes      # 32 tokens as 4 rows of 8
  ps = prompts(11, [3, 7, 30, 12, 5, 64, 9, 2, 17, 40])
  reqs = [(p, GREEDY) for p in ps]
  got = run(multi, reqs)
  used = {t.shape.pre_rows for t in multi.timings}
  assert 4 in used and 1 in used
  assert ids(got) == ids(run(engine, reqs, width=4))
  assert multi.no_leaks() and engine.no_leaks()

