"""Automatic prefix caching (`kv.prefix`): shared full pages by reference count, LRU eviction.

The host bookkeeping on its own first (a pool of a few pages, no JAX), then the tiny model on
8 simulated CPU devices: the same tokens with and without the cache across switches of every
strategy, preemption under a pool too small for the workload, aborts, and no page leaked.
"""

import dataclasses

import numpy as np
import pytest

from flying_jax.config import load_mesh_preset, load_model_card
from flying_jax.engine.engine import Engine
from flying_jax.engine.setup import EngineConfig
from flying_jax.kv import PageLayout, PagePool
from flying_jax.kv.prefix import PrefixCache, page_names
from flying_jax.sampling import SamplingParams
from flying_jax.tokenizers import load_tokenizer

TPP = 4
L1 = PageLayout(width=1, kv_per_device=1, tokens_per_page=TPP)
L2 = PageLayout(width=2, kv_per_device=1, tokens_per_page=TPP)


def _named(cache, pool, first, layout, tokens):
  """A table's pages for `tokens` (full pages only), named in the cache as a sequence's would be."""
  names = page_names(tokens, TPP)
  pages = pool.allocate(first, layout.width, len(names))
  parent = 0x5EED
  for i, (name, page) in enumerate(zip(names, pages)):
    assert cache.register(first, layout, name, parent, tuple(tokens[i * TPP:(i + 1) * TPP]), page)
    parent = name
  return pages, names


def test_shared_pages_are_freed_by_the_last_user_and_evicted_lru():
  pool = PagePool(devices=2, pages=8)                  # 7 usable pages per device
  cache = PrefixCache(pool)
  a = list(range(12))
  pages, names = _named(cache, pool, 0, L1, a)
  assert cache.match(0, L1, a + [99], names) == pages
  assert cache.match(1, L1, a, names) == []            # another device: another placement
  assert cache.match(0, L2, a, names) == []            # another layout: other bytes
  b = a[:8] + [7, 7, 7, 7]                             # shares two pages, then differs
  assert cache.match(0, L1, b, page_names(b, TPP)) == pages[:2]

  cache.acquire(0, L1, pages[:2])                      # a second table takes the shared pages
  assert pool.free_count(0, 1) == 4 and not pool.all_free()
  assert cache.release(0, 1, pages) == []              # the first user ends: all named, kept
  assert pool.parked == 1 and pool.free_count(0, 1) == 5   # its own third page is parked
  assert cache.release(0, 1, pages[:2]) == []          # the last user ends
  assert pool.all_free() and pool.parked == 3 and pool.free_count(0, 1) == 7

  # the pool runs short: parked pages go, least recently used first (a chain's tail first)
  got = pool.allocate(0, 1, 5)
  assert len(got) == 5 and cache.evicted == 1 and cache.match(0, L1, a, names) == pages[:2]
  pool.release(0, 1, got)
  assert pool.free_count(0, 1) == 7


def test_a_wide_placement_is_evicted_for_a_narrow_group_and_collisions_miss():
  pool = PagePool(devices=2, pages=4)                  # 3 usable pages per device
  cache = PrefixCache(pool)
  toks = list(range(8))
  pages, names = _named(cache, pool, 0, L2, toks)      # both devices
  cache.release(0, 2, pages)
  assert pool.free_count(1, 1) == 3 and pool.free_count(0, 2) == 3
  # a forged name (a hash collision) never returns another prompt's page
  forged = [names[0]] + names[1:]
  assert cache.match(0, L2, [5] * 4 + toks[4:], forged) == []
  got = pool.allocate(1, 1, 3)                         # device 1 alone needs every page
  assert len(got) == 3 and cache.cached_pages() == 0 and pool.parked == 0
  pool.release(1, 1, got)
  assert pool.all_free()


def test_a_failed_step_discards_what_only_it_wrote():
  pool = PagePool(devices=1, pages=6)
  cache = PrefixCache(pool)
  pages, _ = _named(cache, pool, 0, L1, list(range(8)))
  assert cache.release(0, 1, pages, discard=True) == pages     # freed, not parked
  assert cache.cached_pages() == 0
  pool.release(0, 1, pages)
  assert pool.all_free() and pool.free_count(0, 1) == 5


# the engine -------------------------------------------------------------------------------------
def _preset(**kw):
  return dataclasses.replace(load_mesh_preset("cpu-8"), decode_buckets=(8,), prefill_chunks=(32,),
                             token_budget=40, **kw)


@pytest.fixture(scope="module")
def card():
  return load_model_card("tiny")


def _engine(card, cache, **kw):
  return Engine(card, _preset(), EngineConfig(widths=(1, 8), prefix_cache=cache, **kw),
                tokenizer=load_tokenizer(card))


@pytest.fixture(scope="module")
def engines(card):
  return _engine(card, True), _engine(card, False)


def _workload(seed, shared=150, n=6):
  rng = np.random.default_rng(seed)
  head = rng.integers(0, 512, size=shared).tolist()
  return [head + rng.integers(0, 512, size=int(k)).tolist() for k in rng.integers(2, 60, size=n)]


SWITCHES = {4: (8, "migrate"), 9: (1, "recompute"), 14: (8, "pause"), 17: (1, "pause"),
            22: (8, "recompute"), 26: (1, "migrate")}


def _serve(engine, prompts, tag, switches=SWITCHES, max_tokens=12):
  sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
  for i, p in enumerate(prompts):
    engine.add_request(f"{tag}-{i}", p, sp)
  k = 0
  while engine.has_unfinished():
    engine.step()
    k += 1
    if k in switches:
      engine.switch(*switches[k], reason="test")
    assert k < 1000
  out = []
  for i in range(len(prompts)):
    seq = engine.request(f"{tag}-{i}")[0]
    out.append((seq.output_ids, seq.cached_tokens))
    engine.release(f"{tag}-{i}")
  return out


def test_same_tokens_with_and_without_the_cache_across_switches(engines):
  cached, plain = engines
  for rnd in range(3):                         # the later rounds find the first one's pages
    prompts = _workload(0) + _workload(rnd + 1, n=3)
    a = _serve(cached, prompts, f"c{rnd}")
    b = _serve(plain, prompts, f"p{rnd}")
    assert [t for t, _ in a] == [t for t, _ in b]
    assert all(c == 0 for _, c in b)
    assert cached.no_leaks() and plain.no_leaks()
  st = cached.stats()
  assert st["prefix_cache"] and st["prefix_cache_hit_tokens"] > 0
  assert 0 < st["prefix_cache_hit_rate"] < 1
  assert sum(c for _, c in a) > 0 and not plain.stats()["prefix_cache"]
  assert cached.pool.parked == st["prefix_cache_parked_pages"] > 0


def test_requests_sharing_a_prompt_share_its_pages_until_the_last_ends(engines):
  engine = engines[0]
  engine.set_width(8)                          # one group (512-token pages): both go there
  prompt = _workload(7, shared=1100, n=1)[0]
  sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
  engine.add_request("first", prompt, sp)
  while engine.request("first")[0].first_token_time is None:
    engine.step()
  engine.add_request("second", prompt, sp)
  engine.step()
  engine.step()
  a, b = engine.request("first")[0], engine.request("second")[0]
  assert b.cached_tokens > 0 and a.first_device == b.first_device
  shared = b.kv.pages[:b.cached_tokens // b.layout.tokens_per_page]
  assert shared == a.kv.pages[:len(shared)]
  engine.abort("first")                        # the shared pages stay with the second
  engine.step()
  used = engine.pool._used[b.first_device]
  assert used >= len(b.kv.pages) and not engine.pool._parked[b.first_device, shared].any()
  while engine.has_unfinished():
    engine.step()
  engine.release("first")
  engine.release("second")
  assert engine.no_leaks() and engine.pool._parked[b.first_device, shared].all()


def test_preemption_and_eviction_in_a_small_pool_leak_nothing(card):
  """Width 1 and 8 with 6 pages per device: the cache fills, evicts, preempted sequences find
  their own pages again; random prompts, switches and aborts leave every page free or parked,
  and the pool counts each page in use once however many tables hold it."""
  engine = _engine(card, True, pages_per_device=6)
  rng = np.random.default_rng(3)
  for rnd in range(3):
    prompts = _workload(rnd % 2, shared=70, n=20)
    sp = SamplingParams(temperature=0.0, max_tokens=int(rng.integers(8, 40)), ignore_eos=True)
    for i, p in enumerate(prompts):
      engine.add_request(f"s{rnd}-{i}", p, sp)
    k = 0
    while engine.has_unfinished():
      engine.step()
      k += 1
      if k == 3:
        engine.abort(f"s{rnd}-5")
      if k in (6, 15):
        engine.switch(8 if engine.width == 1 else 1, ("migrate", "recompute")[rnd % 2])
      held = {(s.first_device, s.layout.width, p) for r in engine._requests.values()
              for s in r if not s.finished for p in s.kv.held()}
      assert engine.pool._total == sum(w for _, w, _ in held)
      assert k < 2000
    for i in range(len(prompts)):
      engine.release(f"s{rnd}-{i}")
    assert engine.no_leaks()
  st = engine.stats()
  assert st["sequences_preempted"] > 0 and st["prefix_cache_evicted_pages"] > 0
  assert st["prefix_cache_hit_tokens"] > 0
  assert engine.pool.free_count(0, 8) == engine.pool.pages - 1     # parked pages count free


def test_bench_prefix_runs_the_workload_without_and_with_the_cache(tmp_path, capsys):
  import json
  import re

  from flying_jax import cli

  out = tmp_path / "prefix.json"
  assert cli.main(["bench", "prefix", "--model", "tiny", "--mesh", "cpu-8", "--requests", "6",
                   "--rate", "20", "--shared-prefix-tokens", "150", "--input-len", "fixed:10",
                   "--output-len", "fixed:4", "--policy", "static:1", "--warmup", "1",
                   "--json", str(out)]) == 0
  text = capsys.readouterr().out
  assert "Median TTFT (ms)" in text and "prefix cache vs no prefix cache" in text
  hit = float(re.search(r"prefix cache hit rate: ([\d.]+)% of prompt tokens", text).group(1))
  assert 0 < hit < 100
  runs = json.loads(out.read_text())["runs"]
  assert set(runs) == {"no prefix cache", "prefix cache"}
  assert all(r["summary"]["completed"] == 6 for r in runs.values())
