"""Hybrid models (some layers slide, some do not: Gemma 3) keep their sliding layers' KV in pools of
their own that hold only the window of each sequence, while the global layers keep every token.

The real engine serves a tiny random Gemma 3 made with transformers (window 8, layers sliding,
sliding, global; 4 tokens per page at width 1) on two devices, with a sliding-layer pool of 8
pages (one prefill's window and chunk) next to 32 for the global layers: generations many times longer than the window give transformers' logits
at widths 1 and 2, each sequence holds at most a window (plus a chunk while it prefills) of
sliding pages while its global pages grow, a sequence that finds no sliding pages waits, and
migrate / pause / recompute switches keep the ids and leak nothing in either pool. Non-hybrid
models (Llama) get no second pool and the programs they always had.
"""

import dataclasses
import itertools

import numpy as np
import pytest

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.sequence import Status
from flying_jax.engine.setup import EngineConfig, page_spaces
from flying_jax.kv import NULL_PAGE
from flying_jax.kv.window import decode_pages
from flying_jax.presets.from_hf import card_from_hf
from flying_jax.sampling import SamplingParams
from flying_jax.sim import hardware as H
from helpers import captured_logits, long_requests, serve_checked, switched_run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WINDOW, PAGE_TOKENS, PAGES, LOCAL_PAGES = 8, 4, 32, 8
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512,
             rms_norm_eps=1e-5, tie_word_embeddings=True, sliding_window=WINDOW,
             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
             query_pre_attn_scalar=24,
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                              "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
PRESET = dict(name="cpu-2-hybrid", devices=2, widths=(1, 2), decode_buckets=(8,),
              prefill_chunks=(16,), token_budget=24, partitions=(), page_tokens=PAGE_TOKENS,
              attention_block_tokens=8, pages_per_device=PAGES)
_ids = itertools.count()


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
  path = tmp_path_factory.mktemp("gemma")
  torch.manual_seed(0)
  model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**SHAPE))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.add_(0.1 * torch.randn_like(p))
  model = model.eval()
  model.save_pretrained(path / "hf", safe_serialization=True)
  (path / "card.toml").write_text(card_from_hf(path / "hf", "tiny-gemma3-hybrid"))
  card = load_model_card(str(path / "card.toml"))
  assert card.arch.hybrid and not card.arch.all_sliding and card.arch.sliding_pattern == 3
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), **PRESET)
  engine = Engine(card, preset, EngineConfig(widths=(1, 2), width=1,
                                             local_pages_per_device=LOCAL_PAGES))
  return model, engine


requests = long_requests


class Watch:
  """Checks both page spaces after every step and remembers what it saw."""

  def __init__(self, engine):
    self.engine, self.most_global, self.local_waits = engine, 0, 0

  def check(self, seqs, was_decoding):
    sch = self.engine.scheduler
    glob, local = sch.spaces
    used = {id(sp.pool): np.zeros(sp.pool.devices, int) for sp in sch.spaces}
    for s in seqs:
      if s.finished or not s.kv.pages:
        continue
      for sp in sch.spaces:
        held = sp.table(s).held()
        assert NULL_PAGE not in held and len(set(held)) == len(held)
        used[id(sp.pool)][s.first_device:s.first_device + s.layout.width] += len(held)
      tpp = s.layout.tokens_per_page
      assert s.kv.dropped == 0 and not s.kv.spare      # the global layers keep every token
      assert len(s.kv.pages) >= s.layout.pages_for(s.computed)
      t = s.local
      assert all(p == NULL_PAGE for p in t.pages[:t.dropped])
      assert t.dropped <= max(0, s.computed - WINDOW + 1) // tpp
      decoded = was_decoding[s.seq_id] and s.status is Status.RUNNING
      limit = decode_pages(WINDOW, tpp) if decoded else local.peak_pages(s.layout)
      assert len(t.held()) <= limit, (s.computed, t)
      self.most_global = max(self.most_global, len(s.kv.held()))
    for sp in sch.spaces:
      np.testing.assert_array_equal(sp.pool._used, used[id(sp.pool)])
    head = sch.waiting[0] if sch.waiting else None
    if head is not None and any(glob.fits(head, g.first_device, g.layout) for g in sch.groups):
      self.local_waits += not any(local.fits(head, g.first_device, g.layout)
                                  for g in sch.groups)


def run(engine, reqs, on_step=None):
  """Serve `reqs` to the end, checking the pages after every step; returns the sequences and
  the watch."""
  watch = Watch(engine)
  seqs = serve_checked(engine, reqs, f"h{next(_ids)}", watch.check, on_step)
  return seqs, watch


def test_sliding_pools_are_smaller_and_hold_the_window(gemma):
  _, engine = gemma
  assert engine.local_pages == LOCAL_PAGES < engine.pages == PAGES
  n = len(engine.devices)
  pools, arch = engine.device_pools, engine.card.arch
  assert pools.layers == (tuple(l for l in range(arch.n_layers) if not arch.sliding(l)),
                          tuple(l for l in range(arch.n_layers) if arch.sliding(l)))
  for space, pages in enumerate((PAGES, LOCAL_PAGES)):       # each space's layers stacked
    want = (len(pools.layers[space]), n * pages, 8, 16)
    assert pools.k[space].shape == pools.v[space].shape == want
  assert {k[1] for k in engine.registry.keys()} == {"step", "sample"}
  rep = engine.report
  assert rep.kv_bytes == sum(a.nbytes for a in engine.device_pools.k + engine.device_pools.v)
  page, pages, local_page, local = H.kv_layout(engine.card, engine.preset, PAGES, engine.config)
  assert (pages, local) == (PAGES, LOCAL_PAGES)
  assert rep.device_kv_bytes == pages * page + local * local_page == rep.kv_bytes // n
  assert any("2 sliding-window layers x 8 pages" in line for line in rep.lines())


@pytest.mark.parametrize("width", (1, 2))
def test_long_generations_match_transformers(gemma, width):
  model, engine = gemma
  engine.set_width(width)
  reqs = requests()
  with captured_logits(engine) as got:
    seqs, watch = run(engine, reqs)
  assert engine.no_leaks() and engine.local_pool.all_free()
  longest = max(s.length for s in seqs)
  assert watch.most_global >= (longest - 1) // engine.scheduler.groups[0].layout.tokens_per_page
  assert watch.most_global > engine.scheduler.spaces[1].peak_pages(
      engine.scheduler.groups[0].layout)
  if width == 1:
    assert watch.local_waits > 0          # the global pool had room, the sliding one did not
  for s, (prompt, sp) in zip(seqs, reqs):
    assert len(s.output_ids) == sp.max_tokens and s.length > 5 * WINDOW
    ids = prompt + s.output_ids
    with torch.no_grad():
      ref = model(torch.tensor([ids])).logits[0].numpy()
    want = ref[len(prompt) - 1:len(ids) - 1]
    np.testing.assert_allclose(np.stack(got[s.seq_id]), want, rtol=1e-4, atol=1e-4,
                               err_msg=f"width {width}")
    assert s.output_ids == [int(r.argmax()) for r in want]
  engine.set_width(1)


def test_switches_in_the_middle_keep_ids_and_leak_nothing(gemma):
  _, engine = gemma
  reqs = requests(1)
  reference = [s.output_ids for s in run(engine, reqs)[0]]
  got, records = switched_run(engine, run, reqs)
  assert [s.output_ids for s in got] == reference
  # the sliding layers move only the tokens a later query still sees (a window and a page)
  per_token = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
  migrated = [r for r in records if r.migrated]
  assert all(0 < r.migrated_window_elements <= r.migrated * (WINDOW + 4 * PAGE_TOKENS) * per_token
             for r in migrated)
  assert sum(r.migrated_elements for r in migrated) > sum(r.migrated_window_elements
                                                          for r in migrated)
  assert engine.no_leaks() and engine.pool.all_free() and engine.local_pool.all_free()


def test_abort_of_paused_sequences_frees_both_pools(gemma):
  _, engine = gemma
  engine.set_width(1)
  seqs = [engine.add_request(f"abort-{i}", p, sp)[0] for i, (p, sp) in enumerate(requests(2))]
  for _ in range(12):
    engine.step()
  engine.switch(2, "pause", reason="test")
  assert any(s.status is Status.PAUSED and s.local.held() for s in seqs)
  for i in range(len(seqs)):
    engine.abort(f"abort-{i}")
  engine.switch(1, "recompute", reason="test")
  assert engine.no_leaks() and engine.local_pool.all_free()
  for i in range(len(seqs)):
    engine.release(f"abort-{i}")


def test_simulated_workload_with_random_switches_leaks_nothing():
  """The same scheduler without JAX: a Gemma-like model (every other layer slides), many
  sequences, every strategy at random steps; both pools checked after every step."""
  from flying_jax.sim.simulate import simulated_engine

  card = load_model_card("tiny")
  arch = dataclasses.replace(card.arch, family="gemma3", sliding_window=WINDOW, sliding_pattern=2)
  card = dataclasses.replace(card, arch=arch)
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), **{**PRESET, "devices": 8,
                                                             "widths": (1, 2, 4, 8)})
  config = EngineConfig(widths=(1, 2, 4, 8), width=1, pages_per_device=96,
                        local_pages_per_device=24)
  engine, _, _ = simulated_engine(card, H.load_hardware("h100-sxm-8"), mesh=preset,
                                     config=config)
  assert engine.local_pages == 24 and len(engine.scheduler.spaces) == 2
  rng = np.random.default_rng(3)
  strategies = itertools.cycle(["migrate", "pause", "recompute", "migrate", "drain"])
  targets = sorted(engine.partitions)

  def switch(k):
    if k % 5 == 0:
      engine.switch(targets[int(rng.integers(len(targets)))], next(strategies), reason="test")

  reqs = [([1] * int(p), SamplingParams(temperature=0.0, max_tokens=int(m), ignore_eos=True))
          for p, m in zip(rng.integers(1, 60, size=40), rng.integers(20, 120, size=40))]
  seqs, watch = run(engine, reqs, switch)
  assert all(len(s.output_ids) == s.params.max_tokens for s in seqs)
  assert len(engine.switches) > 5 and engine.no_leaks() and engine.local_pool.all_free()
  assert watch.local_waits > 0 and watch.most_global > 24


def test_default_sliding_pool_of_gemma3_270m():
  """Gemma-3-270M on cpu-8: 3 global layers x 64 pages, 15 sliding layers x 30 pages (every
  sequence of two windows or more fits the sliding pools whenever it fits the global ones)."""
  card, preset = load_model_card("gemma3-270m"), load_mesh_preset("cpu-8")
  (glob, pages), (local, local_pages) = page_spaces(card, preset, EngineConfig(), 64)
  assert glob == (5, 11, 17) and len(local) == 15 and (pages, local_pages) == (64, 30)
  page, _, local_page, _ = H.kv_layout(card, preset, 64)
  assert page == 3 * local_page // 15 == 3 * 64 * 256 * 4 * 2
  assert 64 * page + 30 * local_page < 0.6 * 18 * 64 * local_page // 15
  whole = page_spaces(card, preset, EngineConfig(free_window_pages=False), 64)
  assert whole == ((tuple(range(18)), 64),)
  with pytest.raises(ValueError, match="needs 12 pages"):
    page_spaces(card, preset, EngineConfig(local_pages_per_device=11), 64)


def test_non_hybrid_models_have_one_page_space():
  card = load_model_card("tiny")
  assert not card.arch.hybrid
  preset = dataclasses.replace(load_mesh_preset("cpu-8"), **PRESET)
  engine = Engine(card, preset, EngineConfig(widths=(1,), width=1))
  assert engine.local_pool is None and engine.local_pages == 0
  assert len(engine.scheduler.spaces) == 1 and len(engine.report.kv_pages) == 1
  assert [a.shape for a in engine.device_pools.k] == [(card.arch.n_layers, 2 * PAGES,
                                                       4 * card.arch.n_kv_heads,
                                                       card.arch.head_dim)]
  assert engine.registry.walk.spaces == (0,) * card.arch.n_layers
  assert not any(s.local_tables for ws in engine.span_setups.values() for s in ws.shapes)
  (seq,) = engine.add_request("llama", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=5,
                                                                 ignore_eos=True))
  while engine.has_unfinished():
    engine.step()
  assert len(seq.output_ids) == 5 and not seq.local.pages and engine.no_leaks()
