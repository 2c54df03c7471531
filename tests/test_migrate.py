"""Migration property: after re-laying a sequence's KV from layout A to layout B, reading it the way
attention reads under B gives, for every token and KV head, exactly what attention read under A.

SmolLM2's 3 KV heads make widths 2 and 4 pad a head and width 8 replicate each head on two
devices: every pair of widths is checked on 8 devices.
"""

import itertools

import jax
import numpy as np
import pytest

from flying_jax.config import load_model_card
from flying_jax.kv.migrate import MigrationPrograms, Placement, migration_indices
from flying_jax.kv.pool import PageLayout
from flying_jax.model.attention import KVGeometry, _gather_block, _gather_keys
from flying_jax.model.heads import plan_heads
from flying_jax.model.weights import lead
from flying_jax.parallel import MeshSpecs, mesh_for_width

ARCH = load_model_card("smollm2-135m").arch
PAGES, PAGE_TOKENS, HD = 12, 4, ARCH.head_dim
SLOTS = PAGE_TOKENS * ARCH.n_kv_heads


def layout(width):
  kvpd = plan_heads(ARCH, width).kv_per_device
  return PageLayout(width, kvpd, SLOTS // kvpd)


def read(pool, placement, n_tokens):
  """{(kv head): (keys [T, hd], values [T, hd])} as attention reads them, from every copy."""
  lay = placement.layout
  geom = KVGeometry(SLOTS, lay.kv_per_device, 1, len(placement.pages))
  plan = plan_heads(ARCH, lay.width)
  out = {}
  table = np.asarray([placement.pages])
  for d in range(lay.width):
    dev = placement.first_device + d
    local = pool[dev * PAGES:(dev + 1) * PAGES]
    v = np.concatenate([np.asarray(_gather_block(local, table[:, i:i + 1], geom))
                        for i in range(table.shape[1])], axis=2)[0]           # [K, T, hd]
    k = np.concatenate([np.asarray(_gather_keys(local, table[:, i:i + 1], geom))
                        for i in range(table.shape[1])], axis=3)[0]           # [K, hd, T]
    for s, h in enumerate(plan.kv_index[d]):
      if h >= 0:
        out.setdefault(int(h), []).append((k[s].T[:n_tokens], v[s][:n_tokens]))
  return out


@pytest.fixture(scope="module")
def programs():
  specs = MeshSpecs(mesh_for_width(jax.devices()[:8], 1))
  struct = jax.ShapeDtypeStruct((2, 8 * PAGES, SLOTS, HD), np.float32)    # two layers stacked
  return specs, MigrationPrograms(struct, specs.per_device(), specs.replicated(), 1 << 14)


@pytest.mark.parametrize("wa, wb", list(itertools.permutations((1, 2, 4, 8), 2)))
def test_migration_preserves_every_head_of_every_token(programs, wa, wb):
  specs, mig = programs
  rng = np.random.default_rng(wa * 10 + wb)
  host = rng.normal(size=(2, 8 * PAGES, SLOTS, HD)).astype(np.float32)
  la, lb = layout(wa), layout(wb)
  n_tokens = int(rng.integers(1, min(la.tokens_per_page, lb.tokens_per_page) * 5))
  a0 = int(rng.integers(0, 8 // wa)) * wa
  b0 = int(rng.integers(0, 8 // wb)) * wb
  pa = rng.permutation(np.arange(1, PAGES))[:la.pages_for(n_tokens)]
  used = set(pa.tolist()) if set(range(a0, a0 + wa)) & set(range(b0, b0 + wb)) else set()
  pb = [p for p in rng.permutation(np.arange(1, PAGES)) if p not in used][:lb.pages_for(n_tokens)]
  src, dst = Placement(a0, la, tuple(pa)), Placement(b0, lb, tuple(pb))
  stacked = lead(specs.per_device())
  k = [jax.device_put(host, stacked)]
  v = [jax.device_put(host + 1, stacked)]
  mig.run(k, v, 0, migration_indices(ARCH, src, dst, n_tokens, PAGES, SLOTS))
  for layer in range(2):                                # one call moves every layer
    before_k, before_v = read(host[layer], src, n_tokens), read(host[layer] + 1, src, n_tokens)
    k_after, v_after = np.asarray(k[0][layer]), np.asarray(v[0][layer])
    after_k, after_v = read(k_after, dst, n_tokens), read(v_after, dst, n_tokens)
    assert sorted(after_k) == list(range(ARCH.n_kv_heads))
    for h in range(ARCH.n_kv_heads):
      want_k, want_v = before_k[h][0][0], before_v[h][0][1]
      for (got_k, _), (_, got_v) in zip(after_k[h], after_v[h]):   # every copy of the head
        np.testing.assert_array_equal(got_k, want_k)
        np.testing.assert_array_equal(got_v, want_v)
