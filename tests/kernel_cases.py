"""Random paged-attention cases shared by the kernel tests (Triton and Mosaic against the
reference)."""

import jax.numpy as jnp
import numpy as np

SLOTS, HD, POOL_PAGES, MAX_PAGES = 16, 8, 40, 12


def pools(seed, dtype=jnp.float32, pages=POOL_PAGES, slots=SLOTS, hd=HD):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((pages, slots, hd)), dtype),
          jnp.asarray(rng.standard_normal((pages, slots, hd)), dtype))


def case(seed, geom, kvlen, q_len, g, hd=HD, pages=POOL_PAGES):
  """Queries, positions, table, lengths and n_blocks for sequences whose last `q_len` tokens
  are the queries (rows with kvlen 0 are padding, any position). Table entries past a
  sequence's pages are garbage outside the pool: neither side may read them."""
  rng = np.random.default_rng(seed)
  s, t = len(kvlen), geom.tokens_per_page
  kvlen = np.asarray(kvlen, np.int32)
  table = rng.integers(0, pages, (s, geom.max_pages)).astype(np.int32)
  used = -(-kvlen // t)
  for i in range(s):
    table[i, used[i]:] = rng.choice([-7, pages + 1, 2 ** 30], geom.max_pages - used[i])
  qpos = np.where(kvlen[:, None] > 0, kvlen[:, None] - q_len + np.arange(q_len)[None, :], 0)
  q = rng.standard_normal((s, q_len, geom.kv_per_device, g, hd)).astype(np.float32)
  n_blocks = max(1, -(-int(kvlen.max()) // (geom.pages_per_block * t)))
  return (jnp.asarray(q), jnp.asarray(qpos.astype(np.int32)), jnp.asarray(table),
          jnp.asarray(kvlen), jnp.int32(n_blocks))


def assert_close(name: str, got, want, tol: float):
  """Kernel output against the reference: same shape and dtype, finite, within `tol`."""
  assert got.shape == want.shape and got.dtype == want.dtype
  assert np.isfinite(got).all()
  err = float(np.abs(got - want).max())
  print(f"{name}: max |kernel - reference| = {err:.2e}")
  assert err <= tol, (name, err)
