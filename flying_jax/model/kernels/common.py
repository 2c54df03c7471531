"""What every paged-attention kernel checks of its arguments before it builds a call."""

from __future__ import annotations

from flying_jax.model.attention import KVGeometry


def check_arguments(q_SxQxKxGxH, k_pool, v_pool, geom: KVGeometry, scale) -> float:
  """Refuse pools and queries that do not fit each other or the geometry (a clear error, not a
  kernel reading the wrong slots); returns the scores' scale (default hd ** -0.5)."""
  k, hd = q_SxQxKxGxH.shape[2], q_SxQxKxGxH.shape[-1]
  _, slots, pool_hd = k_pool.shape
  t = geom.tokens_per_page
  if v_pool.shape != k_pool.shape or pool_hd != hd:
    raise ValueError(f"pools {k_pool.shape}/{v_pool.shape} do not fit q {q_SxQxKxGxH.shape}")
  if k != geom.kv_per_device or k * t > slots or t < 1:
    raise ValueError(f"q has {k} kv heads; geometry {geom} does not fit slots={slots}")
  return hd ** -0.5 if scale is None else float(scale)
