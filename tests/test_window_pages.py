"""Pages wholly before the sliding window are given back while a sequence runs, when every layer
slides (Mistral), and nothing is given back when some layers are global (Gemma 3).

The real engine serves a tiny random Mistral (window 8, 4 tokens per page at width 1) made with
transformers: generations far longer than the window give the same greedy ids and logits as
transformers and as the engine keeping every page, the pages a sequence holds stay bounded, and
switches (migrate, pause, recompute) leak nothing. The simulated engine (the same scheduler,
without JAX) checks the page accounting of larger workloads and of a Gemma-like model.
"""

import dataclasses
import itertools

import numpy as np
import pytest

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.sequence import Status
from flying_jax.engine.setup import EngineConfig
from flying_jax.kv import NULL_PAGE
from flying_jax.presets.from_hf import card_from_hf
from flying_jax.sampling import SamplingParams
from helpers import captured_logits, long_requests, serve_checked, switched_run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WINDOW, PAGE_TOKENS = 8, 4
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512,
             rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
             sliding_window=WINDOW)
PRESET = dict(decode_buckets=(8,), prefill_chunks=(16,), token_budget=24, partitions=(),
              page_tokens=PAGE_TOKENS, attention_block_tokens=8, pages_per_device=32)
_ids = itertools.count()


def decode_bound(tpp: int) -> int:
  """The most pages a decoding sequence reads: the window, and one page cut on each side."""
  return (WINDOW - 1) // tpp + 2


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
  path = tmp_path_factory.mktemp("mistral")
  torch.manual_seed(0)
  model = transformers.MistralForCausalLM(transformers.MistralConfig(**SHAPE)).eval()
  model.save_pretrained(path / "hf", safe_serialization=True)
  (path / "card.toml").write_text(card_from_hf(path / "hf", "tiny-mistral-window"))
  card = load_model_card(str(path / "card.toml"))
  assert card.arch.family == "mistral" and card.arch.all_sliding
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), **PRESET)
  engine = Engine(card, preset, EngineConfig(widths=(1, 2), width=1))
  return model, engine


requests = long_requests


def freeing(engine, on: bool, width=1):
  engine.config = dataclasses.replace(engine.config, free_window_pages=on)
  engine.set_width(width)                       # a new scheduler reads the flag


def check_pages(engine, seqs, was_decoding, bounded: bool):
  """The pool's counts equal the pages the sequences hold; no table gave back a page a later
  query still reads; under freeing, a sequence that decoded holds at most `decode_bound` pages
  and a prefilling (or paused) one at most `peak_pages`."""
  sch, pool = engine.scheduler, engine.pool
  used = np.zeros(pool.devices, int)
  for s in seqs:
    if s.finished or not s.pages:
      continue
    held = s.held_pages()
    assert NULL_PAGE not in held and len(set(held)) == len(held)
    assert all(p == NULL_PAGE for p in s.pages[:s.dropped])
    used[s.first_device:s.first_device + s.layout.width] += len(held)
    if not bounded:
      assert s.dropped == 0 and not s.spare
      continue
    assert s.dropped <= max(0, s.computed - WINDOW + 1) // s.layout.tokens_per_page
    decoded = was_decoding[s.seq_id] and s.status is Status.RUNNING   # (paused: as it was)
    limit = decode_bound(s.layout.tokens_per_page) if decoded else sch.peak_pages(s.layout)
    assert len(held) <= limit, (s.computed, s.pages, s.spare)
  np.testing.assert_array_equal(pool._used, used)


def run(engine, reqs, on_step=None, bounded=True):
  """Serve `reqs` to the end, checking the pages after every step; returns the sequences and
  the most pages one sequence held."""
  most = 0

  def check(seqs, was_decoding):
    nonlocal most
    check_pages(engine, seqs, was_decoding, bounded)
    most = max(most, max(len(s.held_pages()) for s in seqs))
  seqs = serve_checked(engine, reqs, f"w{next(_ids)}", check, on_step)
  return seqs, most


def test_long_generations_match_transformers_with_bounded_pages(mistral):
  model, engine = mistral
  free_at_start = engine.pool.free_count(0, 8)
  reqs = requests()
  freeing(engine, True)
  with captured_logits(engine) as got:
    seqs, most = run(engine, reqs)
  assert most <= engine.scheduler.peak_pages(engine.scheduler.groups[0].layout) == 7
  assert engine.no_leaks()
  assert engine.pool.free_count(0, 8) == free_at_start
  for s, (prompt, sp) in zip(seqs, reqs):
    assert len(s.output_ids) == sp.max_tokens and s.length > 5 * WINDOW
    ids = prompt + s.output_ids
    with torch.no_grad():
      ref = model(torch.tensor([ids])).logits[0].numpy()
    want = ref[len(prompt) - 1:len(ids) - 1]
    np.testing.assert_allclose(np.stack(got[s.seq_id]), want, rtol=1e-4, atol=1e-4)
    assert s.output_ids == [int(r.argmax()) for r in want]

  freeing(engine, False)                        # the engine keeping every page: same logits
  with captured_logits(engine) as kept_logits:
    kept, most_kept = run(engine, reqs, bounded=False)
  freeing(engine, True)
  assert [s.output_ids for s in kept] == [s.output_ids for s in seqs]
  for a, b in zip(seqs, kept):
    np.testing.assert_allclose(np.stack(got[a.seq_id]), np.stack(kept_logits[b.seq_id]),
                               rtol=1e-6, atol=1e-6)
  longest = max(s.length for s in kept)
  assert most_kept >= (longest - 1) // PAGE_TOKENS > decode_bound(PAGE_TOKENS) + 10
  assert engine.no_leaks() and engine.pool.free_count(0, 8) == free_at_start


def test_switches_in_the_middle_keep_ids_and_leak_nothing(mistral):
  _, engine = mistral
  freeing(engine, True)
  reqs = requests(1)
  reference = [s.output_ids for s in run(engine, reqs)[0]]
  got, records = switched_run(engine, run, reqs)
  assert [s.output_ids for s in got] == reference
  # the same prompts twice, and no prefix cache: its pages leave as they pass the window
  assert engine.prefix_cache is None and all(s.cached_tokens == 0 for s in got)
  # migration moves only the tokens a later query still sees (under a window and a page)
  per_token = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
  assert all(r.migrated_elements <= r.migrated * (WINDOW + 2 * PAGE_TOKENS) * per_token
             for r in records if r.migrated)
  assert engine.no_leaks() and engine.pool.all_free()


# ---------------------------------------------------------------- the same scheduler, simulated

def sim_engine(sliding_pattern: int, family: str, free=True):
  from flying_jax.sim import hardware as H
  from flying_jax.sim.simulate import simulated_engine

  card = load_model_card("tiny")
  arch = dataclasses.replace(card.arch, family=family, sliding_window=WINDOW,
                             sliding_pattern=sliding_pattern)
  card = dataclasses.replace(card, arch=arch)
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), **{**PRESET, "pages_per_device": 96})
  config = EngineConfig(widths=(1, 2, 4, 8), width=1, pages_per_device=96,
                        free_window_pages=free)
  engine, _, _ = simulated_engine(card, H.load_hardware("h100-sxm-8"), mesh=preset,
                                  config=config)
  return engine


def sim_requests(seed, n=24):
  rng = np.random.default_rng(seed)
  return [([1] * int(p), SamplingParams(temperature=0.0, max_tokens=int(m), ignore_eos=True))
          for p, m in zip(rng.integers(1, 60, size=n), rng.integers(20, 120, size=n))]


def test_gemma_like_models_free_nothing():
  gemma = sim_engine(2, "gemma3")               # layer 1 of 2 is global
  assert not gemma.card.arch.all_sliding and gemma.scheduler.window == 0
  seqs, most = run(gemma, sim_requests(0, n=4), bounded=False)
  assert most >= max((s.length - 2) // PAGE_TOKENS for s in seqs) > 20   # (and never dropped)
  assert gemma.no_leaks()
  sliding = sim_engine(0, "mistral")
  assert sliding.card.arch.all_sliding and sliding.scheduler.window == WINDOW
  _, most = run(sliding, sim_requests(0, n=4))
  assert most <= sliding.scheduler.peak_pages(sliding.scheduler.groups[0].layout)


def test_simulated_workload_with_random_switches_leaks_nothing():
  """Many sequences, every strategy at random steps: no leak, and the pools hold less than the
  same workload keeping every page."""
  peaks = {}
  for free in (True, False):
    engine = sim_engine(0, "mistral", free)
    rng = np.random.default_rng(3)
    strategies = itertools.cycle(["migrate", "pause", "recompute", "migrate", "drain"])
    targets = sorted(engine.partitions)
    used = []

    def switch(k):
      used.append(engine.pool.used_share())
      if k % 5 == 0:
        engine.switch(targets[int(rng.integers(len(targets)))], next(strategies), reason="test")

    seqs, _ = run(engine, sim_requests(5, n=40), switch, bounded=free)
    assert all(len(s.output_ids) == s.params.max_tokens for s in seqs)
    assert len(engine.switches) > 5 and engine.no_leaks() and engine.pool.all_free()
    peaks[free] = max(used)
  assert peaks[True] < 0.5 * peaks[False]
