"""Sampling: parameter validation, the host packer and the on-device sampler against numpy references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flying_jax.sampling import (
    PARTIAL_TOP_K,
    TOPN,
    RowSpec,
    SamplingParams,
    apply_penalties,
    apply_top_k_top_p,
    pack_sampling,
    process_logits,
    sample,
)


def _batch(params, n=None, *, seeds=None, steps=None, prompts=None, outputs=None, banned=None,
           hist_len=8, max_banned=4):
  """A packed batch of `n` rows (default len(params)); a single SamplingParams is repeated."""
  params = [params] * (n or 1) if isinstance(params, SamplingParams) else params
  n = n or len(params)
  rows = []
  for i in range(len(params)):
    rows.append(RowSpec(
        params=params[i], seed=seeds[i] if seeds is not None else i, step=steps[i] if steps is not None else 0,
        prompt_ids=prompts[i] if prompts else (), output_ids=outputs[i] if outputs else (),
        banned_ids=banned[i] if banned else ()))
  return pack_sampling(rows, n, hist_len, max_banned)


def _sample(logits, batch):
  return jax.jit(sample)(jnp.asarray(logits, jnp.float32), batch)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ---------------------------------------------------------------- params

@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature must be finite and >= 0"),
    (dict(temperature=float("inf")), "temperature must be finite"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k must be"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(min_p=-0.1), "min_p"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens must be <= max_tokens=10"),
    (dict(n=0), "n must be"),
    (dict(logprobs=21), r"logprobs must be None or an integer in \[0, 20\]"),
    (dict(logprobs=-1), "logprobs"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be finite and > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be finite"),
    (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=-3.0), r"frequency_penalty must be in \[-2, 2\]"),
    (dict(stop=["ok", ""]), "stop entries must be non-empty strings"),
    (dict(stop=[3]), "stop entries"),
    (dict(stop_token_ids=[1, -5]), "stop_token_ids entries must be integers >= 0"),
    (dict(seed=1.5), "seed"),
])
def test_params_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kwargs)


def test_params_defaults_and_conversions():
  p = SamplingParams(stop=["a", "b"], stop_token_ids=[2, np.int64(7)], top_k=-1, logprobs=20)
  assert p.stop == ("a", "b") and p.stop_token_ids == (2, 7) and p.top_k == 0
  assert SamplingParams(stop="x").stop == ("x",)
  d = SamplingParams()
  assert (d.temperature, d.top_p, d.top_k, d.min_p, d.max_tokens, d.n) == (1.0, 1.0, 0, 0.0, 16, 1)
  assert not d.greedy and not d.has_penalties
  assert SamplingParams(temperature=0.0).greedy and SamplingParams(top_k=1, temperature=2.0).greedy
  g = SamplingParams.greedy_params(max_tokens=5, seed=3)
  assert g.greedy and g.max_tokens == 5 and g.seed == 3
  assert SamplingParams(frequency_penalty=0.1).has_penalties
  with pytest.raises(dataclasses.FrozenInstanceError):
    d.temperature = 0.5


# ---------------------------------------------------------------- pack

def test_pack_shapes_padding_and_truncation():
  pen = SamplingParams(repetition_penalty=1.2, logprobs=3, top_k=7, seed=1)
  rows = [RowSpec(pen, seed=2**33 + 5, step=4, prompt_ids=list(range(10)), output_ids=np.arange(100, 103),
                  banned_ids=[9]),
          None,
          RowSpec(SamplingParams(), seed=1, step=0, prompt_ids=[1, 2], output_ids=[3])]
  b = pack_sampling(rows, num_rows=4, hist_len=4, max_banned=2)
  assert b.prompt_hist.shape == (4, 4) and b.banned.shape == (4, 2) and b.temperature.shape == (4,)
  np.testing.assert_array_equal(b.prompt_hist[0], [6, 7, 8, 9])        # most recent kept
  np.testing.assert_array_equal(b.output_hist[0], [100, 101, 102, -1])
  np.testing.assert_array_equal(b.banned[0], [9, -1])
  assert b.seed[0] == 5 and b.step[0] == 4 and b.num_logprobs[0] == 3 and b.top_k[0] == 7
  assert b.seed.dtype == np.uint32 and b.prompt_hist.dtype == np.int32
  # Padding rows are greedy without penalties; rows without penalties carry no history.
  for i in (1, 3):
    assert b.temperature[i] == 0 and b.repetition_penalty[i] == 1 and (b.prompt_hist[i] == -1).all()
  assert (b.prompt_hist[2] == -1).all() and b.temperature[2] == 1.0
  with pytest.raises(ValueError, match="max_banned=2"):
    pack_sampling([RowSpec(pen, 0, 0, banned_ids=[1, 2, 3])], 1, 4, 2)
  with pytest.raises(ValueError, match="num_rows=1"):
    pack_sampling([None, None], 1, 4, 2)


# ---------------------------------------------------------------- greedy

def test_greedy_is_argmax_in_mixed_batch():
  logits = np.random.default_rng(0).normal(size=(8, 300)) * 2
  params = [SamplingParams.greedy_params() if i % 2 == 0 else SamplingParams(temperature=0.7) for i in range(8)]
  out = _sample(logits, _batch(params))
  np.testing.assert_array_equal(np.asarray(out.tokens)[::2], logits.argmax(1)[::2])
  out = _sample(logits, _batch(SamplingParams.greedy_params(), 8))
  np.testing.assert_array_equal(out.tokens, logits.argmax(1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_is_greedy(temperature):
  logits = np.random.default_rng(1).normal(size=(8, 300))
  out = _sample(logits, _batch(SamplingParams(temperature=temperature, top_k=1), 8))
  np.testing.assert_array_equal(out.tokens, logits.argmax(1))


# ---------------------------------------------------------------- randomness

def test_seed_and_step_reproducible_and_position_independent():
  logits = np.zeros((64, 1000), np.float32)
  params = SamplingParams(temperature=1.0)
  seeds, steps = list(range(100, 164)), [3] * 64
  a = np.asarray(_sample(logits, _batch(params, 64, seeds=seeds, steps=steps)).tokens)
  b = np.asarray(_sample(logits, _batch(params, 64, seeds=seeds, steps=steps)).tokens)
  np.testing.assert_array_equal(a, b)
  perm = np.random.default_rng(0).permutation(64)
  c = np.asarray(_sample(logits, _batch(params, 64, seeds=[seeds[i] for i in perm], steps=steps)).tokens)
  np.testing.assert_array_equal(c, a[perm])
  # One request (seed 7) over 64 steps: the draws differ from step to step.
  d = np.asarray(_sample(np.zeros((64, 1000)), _batch(params, 64, seeds=[7] * 64, steps=list(range(64)))).tokens)
  assert len(set(d.tolist())) > 50


def _counts(logits_row, params, banned=None):
  """Token histogram of 4096 draws (one per seed) from one row of logits, padded to 8 with -inf."""
  n, vocab = 4096, len(logits_row)
  row = np.concatenate([np.asarray(logits_row, np.float32), np.full(8 - vocab, -np.inf, np.float32)])
  batch = _batch(params, n, banned=[banned] * n if banned else None)   # one shape: one compilation
  tokens = np.asarray(_sample(np.broadcast_to(row, (n, 8)), batch).tokens)
  assert tokens.max() < vocab
  return np.bincount(tokens, minlength=vocab)


def test_empirical_distribution_matches_softmax():
  row = np.array([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -3.0])
  counts = _counts(row, SamplingParams(temperature=1.0))
  expected = np.exp(_log_softmax(row)) * counts.sum()
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 30, (chi2, counts, expected)        # df = 7: p(chi2 > 30) < 1e-4 (seeds are fixed)
  # temperature 2 flattens: compare with softmax(row / 2)
  counts = _counts(row, SamplingParams(temperature=2.0))
  expected = np.exp(_log_softmax(row / 2)) * counts.sum()
  assert ((counts - expected) ** 2 / expected).sum() < 30


def test_top_p_and_min_p_keep_the_right_sets():
  row = np.log([0.5, 0.3, 0.12, 0.05, 0.03])
  kept = lambda params: set(np.nonzero(_counts(row, params))[0].tolist())
  assert kept(SamplingParams(top_p=0.7)) == {0, 1}
  assert kept(SamplingParams(top_p=0.85)) == {0, 1, 2}
  assert kept(SamplingParams(top_p=0.1)) == {0}
  assert kept(SamplingParams(top_k=3)) == {0, 1, 2}
  assert kept(SamplingParams(top_k=3, top_p=0.9)) == {0, 1, 2}
  assert kept(SamplingParams(min_p=0.2)) == {0, 1, 2}       # prob >= 0.1
  assert kept(SamplingParams(min_p=0.5)) == {0, 1}          # prob >= 0.25
  assert kept(SamplingParams()) == {0, 1, 2, 3, 4}
  # Within the kept set, draws follow the renormalised probabilities.
  counts = _counts(row, SamplingParams(top_p=0.7))
  assert abs(counts[0] / counts.sum() - 0.5 / 0.8) < 0.03


def _reference_keep(logits, top_k, top_p):
  """numpy reference of top-k then top-p: a sorted prefix, ties at the threshold kept."""
  keep = np.zeros(logits.shape, bool)
  for i, (row, k, p) in enumerate(zip(logits, top_k, top_p)):
    vals = np.sort(row)[::-1]
    thresh = vals[k - 1] if k > 0 else -np.inf
    vals = vals[vals >= thresh]
    probs = np.exp(vals - vals[0]) / np.exp(vals - vals[0]).sum()
    before = np.cumsum(probs) - probs
    n = max(int((before < p).sum()), 1) if p < 1 else len(vals)
    keep[i] = row >= max(vals[n - 1], thresh)
  return keep


def test_top_k_top_p_matches_reference_on_all_paths():
  rng = np.random.default_rng(3)
  vocab = 2048
  logits = (rng.normal(size=(12, vocab)) * np.array([0.3] * 4 + [3.0] * 4 + [8.0] * 4)[:, None]).astype(np.float32)
  top_k = np.array([0, 5, PARTIAL_TOP_K + 300, 0, 40, 0, 1000, 3, 0, 0, 7, 2 * PARTIAL_TOP_K], np.int32)
  top_p = np.array([0.9, 1.0, 0.95, 0.5, 0.9, 0.99, 1.0, 0.5, 0.3, 1.0, 0.95, 0.8], np.float32)
  got = np.asarray(jax.jit(apply_top_k_top_p)(logits, top_k, top_p)) > -np.inf
  np.testing.assert_array_equal(got, _reference_keep(logits, top_k, top_p))
  # Only small-k rows: the partial top_k path alone.
  got = np.asarray(jax.jit(apply_top_k_top_p)(logits, np.full(12, 9, np.int32), np.full(12, 0.9, np.float32)))
  np.testing.assert_array_equal(got > -np.inf, _reference_keep(logits, [9] * 12, [0.9] * 12))


# ---------------------------------------------------------------- penalties, bans

def test_penalties_on_hand_computed_logits():
  logits = np.array([[2.0, -1.0, 0.5, 3.0, -2.0], [2.0, -1.0, 0.5, 3.0, -2.0]], np.float32)
  params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
            SamplingParams()]
  batch = _batch(params, prompts=[[0, 1], [0, 1]], outputs=[[1, 3, 3], [1, 3, 3]], banned=[[], [4]])
  got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), batch))
  # 0: prompt only -> 2/2; 1: prompt+output once -> -1*2 - .25 - .5; 2: unseen; 3: output twice -> 3/2 - .5 - .5
  np.testing.assert_allclose(got[0], [1.0, -2.75, 0.5, 0.5, -2.0], rtol=1e-6)
  np.testing.assert_array_equal(got[1], logits[1])
  processed = np.asarray(jax.jit(process_logits)(jnp.asarray(logits), batch))
  np.testing.assert_allclose(processed[0], got[0], rtol=1e-6)
  np.testing.assert_array_equal(processed[1], [2.0, -1.0, 0.5, 3.0, -np.inf])
  # Greedy with the penalty: token 0 and 2/3 tie at ... argmax of [1, -2.75, .5, .5, -2] is 0.
  out = _sample(logits, _batch([SamplingParams.greedy_params(repetition_penalty=2.0, presence_penalty=0.5,
                                                             frequency_penalty=0.25)] * 2,
                               prompts=[[0, 1]] * 2, outputs=[[1, 3, 3]] * 2))
  np.testing.assert_array_equal(out.tokens, [0, 0])


def test_banned_ids_never_sampled():
  row = np.array([5.0, 4.0, 0.0, 0.0, 0.0, 0.0])
  assert (_counts(row, SamplingParams(temperature=3.0))[:2] > 0).all()
  counts = _counts(row, SamplingParams(temperature=3.0), banned=[0, 1])
  assert counts[0] == counts[1] == 0 and (counts[2:] > 0).all()
  logits = np.broadcast_to(row, (2, 6))
  greedy = _sample(logits, _batch(SamplingParams.greedy_params(), 2, banned=[[0], [0, 1]]))
  np.testing.assert_array_equal(greedy.tokens, [1, 2])


# ---------------------------------------------------------------- logprobs

def test_logprobs_are_raw_log_softmax():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(8, 300)).astype(np.float32) * 3
  params = [SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=5), SamplingParams(logprobs=None),
            SamplingParams.greedy_params(logprobs=20), SamplingParams(top_k=3, logprobs=0)] * 2
  out = _sample(logits, _batch(params, prompts=[[1, 2, 3]] * 8))
  ref = _log_softmax(logits)
  tokens = np.asarray(out.tokens)
  np.testing.assert_allclose(out.logprob, ref[np.arange(8), tokens], atol=1e-4)
  order = np.argsort(-ref, axis=1)[:, :TOPN]
  np.testing.assert_array_equal(out.top_ids, order)
  np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, order, 1), atol=1e-4)
  none = _sample(logits, _batch(SamplingParams(), 8))
  assert not np.asarray(none.top_ids).any() and np.asarray(none.top_logprobs).shape == (8, TOPN)


# ---------------------------------------------------------------- compilation

def test_aot_compile_and_shard_map():
  rows, vocab = 16, 512
  batch = _batch(SamplingParams(temperature=0.8, top_p=0.9, frequency_penalty=0.3, logprobs=2), rows,
                 outputs=[[1, 2, 2]] * rows)
  specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
  compiled = jax.jit(sample).lower(jax.ShapeDtypeStruct((rows, vocab), jnp.float32), specs).compile()
  logits = jnp.asarray(np.random.default_rng(5).normal(size=(rows, vocab)), jnp.float32)
  want = compiled(logits, batch)
  mesh = jax.make_mesh((8,), ("data",))
  spec = jax.sharding.PartitionSpec("data")
  sharded = jax.jit(jax.shard_map(sample, mesh=mesh, in_specs=(spec, spec), out_specs=spec))
  shard = jax.sharding.NamedSharding(mesh, spec)
  got = sharded(jax.device_put(logits, shard), jax.device_put(batch, shard))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logprob, want.logprob, rtol=1e-6)


def test_empty_history_and_banned_widths():
  logits = np.random.default_rng(6).normal(size=(4, 64))
  batch = _batch(SamplingParams(repetition_penalty=1.3), 4, hist_len=0, max_banned=0)
  np.testing.assert_array_equal(_sample(logits, batch).tokens.shape, (4,))


def test_a_row_packed_once_then_updated_equals_a_row_packed_whole():
  """The executor packs a sequence's sampling row once and writes only its step counter, output
  history and banned ids every step (`sampling_pack.pack_one`, `set_dynamic`): the same arrays as
  packing the whole row every step."""
  from flying_jax.runtime.sampling_pack import (pack_one, pack_rows, sample_len, set_dynamic,
                                                unpack_sampling)
  hist, banned_max = 8, 4
  rng = np.random.default_rng(0)
  cases = [SamplingParams(), SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, seed=3,
                                            logprobs=2),
           SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2)]
  for params in cases:
    prompt = rng.integers(0, 100, size=12).tolist()
    once = pack_one(RowSpec(params=params, seed=12345, step=0, prompt_ids=prompt), hist,
                    banned_max)
    for n_out in (0, 3, 20):
      out = rng.integers(0, 100, size=n_out).tolist()
      for banned in ([], [1, 2]):
        whole = np.zeros((1, sample_len(hist, banned_max)), np.int32)
        spec = RowSpec(params=params, seed=12345, step=n_out, prompt_ids=prompt, output_ids=out,
                       banned_ids=banned)
        packed = pack_sampling([spec], 1, hist, banned_max)
        pack_rows(packed, whole)
        row = once.copy()
        set_dynamic(row, n_out, out, banned, hist, banned_max, params.has_penalties)
        np.testing.assert_array_equal(row, whole[0])
        # the words unpack (float32 fields from their bits) to the fields packed
        back = unpack_sampling(jnp.asarray(row[None]), hist, banned_max)
        for name, want in vars(packed).items():
          np.testing.assert_array_equal(np.asarray(getattr(back, name)), want, err_msg=name)
  with pytest.raises(ValueError, match="max_banned=4"):
    set_dynamic(once.copy(), 0, [], [1, 2, 3, 4, 5], hist, banned_max, False)
