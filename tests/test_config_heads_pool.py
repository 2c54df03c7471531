"""Configs, head plans and the KV page pool: host-side invariants, plus the slot written == slot read."""

import dataclasses
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flying_jax.config import (
    ConfigError,
    MeshPreset,
    available,
    load_mesh_preset,
    load_model_card,
)
from flying_jax.kv import PageLayout, PagePool, PoolExhausted
from flying_jax.model.attention import KVGeometry, _gather_block, _gather_keys, write_k, write_kv
from flying_jax.model.heads import padding_report, plan_heads

WIDTHS = (1, 2, 4, 8)
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- cards and presets

@pytest.mark.parametrize("name", available("models"))
def test_every_model_card_loads(name):
  card = load_model_card(name)
  a = card.arch
  assert card.name and a.n_heads % a.n_kv_heads == 0 and a.group_size * a.n_kv_heads == a.n_heads
  assert a.param_count() > 0
  assert card.weights.format in {"gguf", "safetensors", "orbax", "random"}


@pytest.mark.parametrize("name", available("meshes"))
def test_every_mesh_preset_loads(name):
  p = load_mesh_preset(name)
  assert p.name == name and p.devices >= 1 and p.devices % p.base_width == 0
  assert all(p.devices % w == 0 and w % p.base_width == 0 for w in p.widths)
  assert p.decode_buckets and p.prefill_chunks and p.page_tokens > 0 and p.pages_per_device >= 2


def test_shipped_names():
  assert {"tiny", "smollm2-135m"} <= set(available("models"))
  assert {"cpu-1", "cpu-8"} <= set(available("meshes"))
  assert load_mesh_preset("cpu-8").devices == 8 and load_mesh_preset("cpu-1").devices == 1


@pytest.mark.parametrize("loader, kind", [(load_model_card, "models"), (load_mesh_preset, "meshes")])
def test_unknown_name_lists_known_ones(loader, kind):
  with pytest.raises(ConfigError, match="unknown") as err:
    loader("no-such-name")
  msg = str(err.value)
  assert "no-such-name" in msg and "known" in msg
  for known in available(kind):
    assert known in msg


def test_missing_toml_path_and_unknown_keys(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    load_mesh_preset(str(tmp_path / "absent.toml"))
  bad = tmp_path / "bad.toml"
  bad.write_text((REPO / "meshes" / "cpu-8.toml").read_text().replace("[batching]",
                                                                     "bogus_key = 1\n[batching]"))
  with pytest.raises(ConfigError, match="bogus_key"):
    load_mesh_preset(str(bad))


def test_preset_rejects_bad_widths_and_empty_buckets():
  p = load_mesh_preset("cpu-8")
  for widths in ((3,), (16,), (0,)):
    with pytest.raises(ConfigError, match="width"):
      dataclasses.replace(p, widths=widths)
  with pytest.raises(ConfigError, match="decode_buckets"):
    dataclasses.replace(p, decode_buckets=())
  with pytest.raises(ConfigError, match="base width 2"):   # width 1 is narrower than an engine
    dataclasses.replace(p, base_width=2)
  with pytest.raises(ConfigError, match="base_width 3"):
    dataclasses.replace(p, base_width=3, widths=(3,))
  assert dataclasses.replace(p, base_width=2, widths=(2, 8), partitions=()).base_width == 2
  assert isinstance(p, MeshPreset)


# ---------------------------------------------------------------- head plans

@pytest.mark.parametrize("model", ["smollm2-135m", "tiny"])
@pytest.mark.parametrize("width", WIDTHS)
def test_plan_covers_each_query_head_once_next_to_its_kv_head(model, width):
  arch = load_model_card(model).arch
  plan = plan_heads(arch, width)
  assert plan.q_index.shape == (width, plan.kv_per_device * plan.q_per_kv)
  assert plan.kv_index.shape == (width, plan.kv_per_device)
  q = plan.q_index[plan.q_index >= 0]
  assert sorted(q.tolist()) == list(range(arch.n_heads))
  for d in range(width):
    for slot, h in enumerate(plan.q_index[d]):
      if h >= 0:
        assert plan.kv_index[d, slot // plan.q_per_kv] == h // arch.group_size
  # every KV head lives on some device; padded KV slots carry no query head
  assert set(plan.kv_index[plan.kv_index >= 0].tolist()) == set(range(arch.n_kv_heads))
  for d, s in zip(*np.nonzero(plan.kv_index < 0)):
    assert (plan.q_index[d, s * plan.q_per_kv:(s + 1) * plan.q_per_kv] < 0).all()
  assert plan.is_identity == (width == 1)


def test_padding_report_smollm2():
  """9 query / 3 KV heads: hand-computed head counts and padding costs.

  Projection cost per device in units of hd * dim is (q + 2 kv) + q; unpadded it is 15 + 9 = 24.
  w=2: 2 kv x 3 q per device -> 2 * (10 + 6) = 32 -> +1/3; KV copies 4/3 -> +1/3.
  w=4: 1 kv x 3 q -> 4 * (5 + 3) = 32 -> +1/3; KV heads padded to 4 -> +1/3.
  w=8: KV padded to 4, each replicated twice, ceil(3/2) = 2 q -> 8 * (4 + 2) = 48 -> +1; 8/3 -> +5/3.
  """
  arch = load_model_card("smollm2-135m").arch
  expected = {1: (9, 3, 0, Fraction(0), Fraction(0)),
              2: (6, 2, 3, Fraction(1, 3), Fraction(1, 3)),
              4: (3, 1, 3, Fraction(1, 3), Fraction(1, 3)),
              8: (2, 1, 7, Fraction(1), Fraction(5, 3))}
  for w, (q, kv, padded, flops, kvb) in expected.items():
    r = padding_report(arch, w)
    assert (r["width"], r["q_heads_per_device"], r["kv_heads_per_device"], r["padded_q_heads"]) == (
        w, q, kv, padded)
    assert r["attn_proj_flops_extra"] == pytest.approx(float(flops))
    assert r["kv_bytes_per_token_extra"] == pytest.approx(float(kvb))


@pytest.mark.parametrize("width", WIDTHS)
def test_padding_report_tiny_has_no_padding(width):
  arch = load_model_card("tiny").arch
  r = padding_report(arch, width)
  assert r["q_heads_per_device"] * width == arch.n_heads
  assert r["kv_heads_per_device"] * width == arch.n_kv_heads
  assert r["padded_q_heads"] == 0
  assert r["attn_proj_flops_extra"] == pytest.approx(0.0)
  assert r["kv_bytes_per_token_extra"] == pytest.approx(0.0)


# ---------------------------------------------------------------- the host page pool

def test_pool_allocate_release_and_exhaustion():
  pool = PagePool(devices=4, pages=6)
  assert pool.all_free() and pool.free_count(0, 4) == 5          # page 0 is the null page
  a = pool.allocate(0, 2, 3)
  assert len(a) == len(set(a)) == 3 and 0 not in a
  assert pool.free_count(0, 2) == 2 and pool.free_count(2, 2) == 5
  assert pool.free_count(0, 4) == 2                               # a group spanning both halves
  b = pool.allocate(2, 2, 5)
  assert 0 not in b and pool.free_count(2, 2) == 0
  with pytest.raises(PoolExhausted):
    pool.allocate(0, 2, 3)
  with pytest.raises(PoolExhausted):
    pool.allocate(1, 2, 1)                                          # device 2 is full
  assert pool.allocate(0, 1, 0) == []
  np.testing.assert_allclose(pool.used_fraction(), [0.6, 0.6, 1.0, 1.0])
  assert not pool.all_free()
  pool.release(0, 2, a)
  with pytest.raises(AssertionError, match="double free"):
    pool.release(0, 2, a)
  pool.release(2, 2, b[:2])
  with pytest.raises(AssertionError, match="double free"):
    pool.release(2, 2, b[1:])                                     # b[1] was already released
  pool.release(2, 2, b[2:])
  assert pool.all_free() and pool.free_count(0, 4) == 5


def test_pool_double_free_detected_per_device():
  pool = PagePool(devices=2, pages=4)
  ids = pool.allocate(0, 1, 2)                                    # only device 0
  with pytest.raises(AssertionError, match="double free"):
    pool.release(0, 2, ids)                                       # device 1 never held them
  pool.release(0, 1, ids)
  pool.release(0, 1, [])
  assert pool.all_free()


def test_pool_needs_a_null_page_and_one_more():
  with pytest.raises(ValueError, match="at least 2 pages"):
    PagePool(devices=1, pages=1)


def test_page_layout_pages_for():
  lay = PageLayout(width=2, kv_per_device=4, tokens_per_page=32)
  assert [lay.pages_for(t) for t in (0, 1, 32, 33, 64, 65)] == [0, 1, 1, 2, 2, 3]


# ---------------------------------------------------------------- slot written == slot read

def _interpretations():
  for page_tokens, n_kv in ((16, 3), (16, 8), (4, 2)):
    slots = page_tokens * n_kv
    for kvpd in (1, 2, 3, 4, 8):
      if slots % kvpd == 0:
        yield slots, kvpd


@pytest.mark.parametrize("slots, kvpd", list(_interpretations()))
def test_write_kv_then_gather_block_round_trip(slots, kvpd):
  """Token p, head h of a sequence lands exactly where `_gather_block` reads position p, head h.

  Random over seeds: two sequences on disjoint random pages, random lengths, positions written in
  random order, plus padding writes past the pool (dropped). Shapes are fixed per interpretation so
  each one compiles once.
  """
  hd, n_pages, max_seq_pages = 3, 11, 4
  tpp = slots // kvpd
  ppb = 1 + (slots + kvpd) % 3
  geom = KVGeometry(slots=slots, kv_per_device=kvpd, pages_per_block=ppb, max_pages=8)
  n_writes = 2 * max_seq_pages * tpp + 5
  write = jax.jit(write_kv, static_argnums=3)
  write_keys = jax.jit(write_k, static_argnums=3)
  gather_keys = jax.jit(_gather_keys, static_argnums=2)
  gather = jax.jit(_gather_block, static_argnums=2)
  for seed in range(6):
    rng = np.random.default_rng([seed, slots, kvpd])
    pool = rng.normal(size=(n_pages, slots, hd)).astype(np.float32)
    free = rng.permutation(np.arange(1, n_pages))                 # page 0 stays the null page
    base = np.full(n_writes, n_pages * slots, np.int32)           # padding: out of range, dropped
    writes = rng.normal(size=(n_writes, kvpd, hd)).astype(np.float32)
    seqs, at = [], 0
    for npg in rng.integers(1, max_seq_pages + 1, size=2):
      pages, free = free[:npg], free[npg:]
      length = int(rng.integers(1, npg * tpp + 1))
      kv = rng.normal(size=(length, kvpd, hd)).astype(np.float32)  # in position order
      pos = rng.permutation(length)                                 # written in any order
      base[at:at + length] = pages[pos // tpp] * slots + pos % tpp  # as the executor does
      writes[at:at + length] = kv[pos]
      at += length
      seqs.append((pages, kv))
    out = np.asarray(write(jnp.asarray(pool), jnp.asarray(writes), jnp.asarray(base), tpp))
    out_k = np.asarray(write_keys(jnp.asarray(pool), jnp.asarray(writes), jnp.asarray(base), geom))
    for pages, kv in seqs:
      cols = -(-len(pages) // ppb) * ppb
      table = np.zeros((1, cols), np.int32)                        # unused columns: the null page
      table[0, :len(pages)] = pages
      got = np.concatenate([np.asarray(gather(jnp.asarray(out), jnp.asarray(table[:, b:b + ppb]),
                                              geom)) for b in range(0, cols, ppb)], axis=2)[0]
      assert got.shape == (kvpd, cols * tpp, hd)
      got = got.transpose(1, 0, 2)                                 # [position, head, hd]
      keys = np.concatenate([np.asarray(gather_keys(jnp.asarray(out_k),
                                                    jnp.asarray(table[:, b:b + ppb]), geom))
                             for b in range(0, cols, ppb)], axis=3)[0]   # [head, hd, position]
      np.testing.assert_array_equal(keys.transpose(2, 0, 1)[:len(kv)], kv)
      np.testing.assert_array_equal(got[:len(kv)], kv)
    # nothing but the written slots changed, the null page included
    touched = np.zeros(pool.shape[:2], bool)
    for b in base[:at]:
      touched[b // slots, b % slots + tpp * np.arange(kvpd)] = True
    assert touched.sum() == at * kvpd
    assert not touched[0].any()
    np.testing.assert_array_equal(out[~touched], pool[~touched])
    # keys are stored transposed: (head, d, token) of a page at (head * hd + d) * tpp + token
    touched_k = np.zeros(pool.size, bool)
    for b in base[:at]:
      page, off = divmod(int(b), slots)
      cols_hd = (np.arange(kvpd)[:, None] * hd + np.arange(hd)[None, :]) * tpp
      touched_k[page * slots * hd + off + cols_hd.reshape(-1)] = True
    assert not touched_k[:slots * hd].any()                       # the null page is untouched
    flat_in, flat_out = pool.reshape(-1), out_k.reshape(-1)
    np.testing.assert_array_equal(flat_out[~touched_k], flat_in[~touched_k])


def test_pool_counts_agree_with_its_page_tables_under_random_use():
  """The running counts (free pages of a group, share used, all free) match the page tables
  after any mix of allocations and releases over groups of every width."""
  rng = np.random.default_rng(0)
  pool = PagePool(devices=8, pages=40)
  held = []
  for _ in range(400):
    if held and rng.uniform() < 0.45:
      first, width, ids = held.pop(int(rng.integers(len(held))))
      pool.release(first, width, ids)
    else:
      width = int(rng.choice([1, 2, 4, 8]))
      first = width * int(rng.integers(8 // width))
      n = int(rng.integers(1, 6))
      try:
        held.append((first, width, pool.allocate(first, width, n)))
      except PoolExhausted:
        pass
    free = pool._free
    for width in (1, 2, 4, 8):
      for first in range(0, 8, width):
        assert pool.free_count(first, width) == int(free[first:first + width].all(axis=0).sum())
    assert pool.used_share() == pytest.approx(1 - free[:, 1:].sum() / (8 * 39))
    np.testing.assert_allclose(pool.used_fraction(), 1 - free[:, 1:].sum(axis=1) / 39)
    assert pool.all_free() == (not held)
  for first, width, ids in held:
    pool.release(first, width, ids)
  assert pool.all_free() and pool.used_share() == 0


@pytest.mark.parametrize("backend,count,expected", [
    ("cpu", 8, "cpu-8"), ("cpu", 1, "cpu-1"), ("gpu", 8, "gpu-8"), ("gpu", 1, "gpu-1"),
    ("tpu", 8, "tpu-v5e-8"), ("tpu", 1, "tpu-1")])
def test_default_mesh_fits_the_devices(monkeypatch, backend, count, expected):
  import jax

  from flying_jax.config import default_mesh_name, load_mesh_preset
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(jax, "device_count", lambda: count)
  name = default_mesh_name()
  assert name == expected
  preset = load_mesh_preset(name)
  assert preset.devices == count and preset.platform == backend
