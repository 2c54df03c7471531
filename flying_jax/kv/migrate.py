"""Migration: re-lay a sequence's KV from one page layout to another inside a compiled program.

A switch that changes a sequence's group (devices, width) changes which device holds each KV head
and how many tokens a page holds. The host computes, for every (token, KV head, head-dim element)
of the sequence, its flat address in the old layout and its address(es) in the new one (a head
replicated over several devices is written to each copy). One program per size bucket gathers the
old values and scatters them to the new addresses across the whole mesh; XLA turns the
cross-device part into a collective. Keys are stored transposed (see `model.attention`), values
head-major, so the two get different addresses. A hybrid model's sliding-window layers keep their
KV in pools of their own (`kv.window`): they migrate with their own tables and programs, only the
tokens still in the window.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flying_jax.config import Architecture
from flying_jax.kv.pool import PageLayout
from flying_jax.model.heads import plan_heads
from flying_jax.parallel.partition import position_of_rank


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a sequence's KV lives: its group's first device, its layout and its page ids."""
  first_device: int
  layout: PageLayout
  pages: tuple[int, ...]


def _head_homes(arch: Architecture, width: int, base: int = 1) -> dict[int, list[tuple[int, int]]]:
  """KV head -> [(device offset in the group, slot of the head on that device)]."""
  plan = plan_heads(arch, width)
  homes: dict[int, list[tuple[int, int]]] = {}
  for r in range(width):                      # ranks; a rank's device: `position_of_rank`
    for s, h in enumerate(plan.kv_index[r]):
      if h >= 0:
        homes.setdefault(int(h), []).append((position_of_rank(r, width, base), s))
  return homes


def _addresses(p: Placement, dev_offset: int, slot: int, tokens: np.ndarray, pages_per_device: int,
               slots: int, hd: int):
  """Flat V and K addresses [T, hd] of one head's tokens on one device of the placement."""
  tpp = p.layout.tokens_per_page
  device = p.first_device + dev_offset
  page = np.asarray(p.pages, np.int64)[tokens // tpp]
  off = tokens % tpp
  base = (device * pages_per_device + page) * slots * hd                  # [T]
  e = np.arange(hd, dtype=np.int64)
  v = base[:, None] + (slot * tpp + off)[:, None] * hd + e[None, :]
  k = base[:, None] + (slot * hd + e[None, :]) * tpp + off[:, None]
  return v, k


def migration_indices(arch: Architecture, src: Placement, dst: Placement, n_tokens: int,
                      pages_per_device: int, slots: int, start: int = 0):
  """(src_v, dst_v, src_k, dst_k) flat int arrays of equal length: copy pool[src] to pool[dst]
  for tokens [start, n_tokens) (those before `start` may have left both page tables)."""
  hd = arch.head_dim
  tokens = np.arange(start, n_tokens, dtype=np.int64)
  homes_src = _head_homes(arch, src.layout.width, src.layout.base)
  homes_dst = _head_homes(arch, dst.layout.width, dst.layout.base)
  parts = ([], [], [], [])
  for h in range(arch.n_kv_heads):
    sv, sk = _addresses(src, *homes_src[h][0], tokens, pages_per_device, slots, hd)
    for d, s in homes_dst[h]:
      dv, dk = _addresses(dst, d, s, tokens, pages_per_device, slots, hd)
      for acc, a in zip(parts, (sv, dv, sk, dk)):
        acc.append(a.reshape(-1))
  return tuple(np.concatenate(a) if a else np.zeros(0, np.int64) for a in parts)


def buckets(max_elements: int, smallest: int = 1 << 12) -> list[int]:
  out, b = [], smallest
  while True:
    out.append(b)
    if b >= max_elements:
      return out
    b *= 2


def _migrate_stack(k_stack, v_stack, src_v, dst_v, src_k, dst_k):
  """The same moves in every layer of a page space's stacked pools."""
  def move(pool, src, dst):
    flat = pool.reshape(-1)
    return flat.at[dst].set(flat[src], mode="drop").reshape(pool.shape)
  each = jax.vmap(move, in_axes=(0, None, None))
  return each(k_stack, src_k, dst_k), each(v_stack, src_v, dst_v)


class MigrationPrograms:
  """AOT-compiled migration programs, one per size bucket, for the stacked K and V pools of one
  page space (`kv.pool.DevicePools`: every layer moved by one call); with `more` ((stack struct,
  max elements), ...), also for stacks of other shapes (the sliding layers' smaller pools of a
  hybrid model)."""

  def __init__(self, stack_struct, per_device_sharding, replicated_sharding, max_elements: int,
               more: tuple = (), cache=None):
    """`cache`: a `runtime.exec_cache.ExecutableCache` to keep the programs in between runs."""
    from flying_jax.model.weights import lead
    from flying_jax.runtime.exec_cache import ExecutableCache

    cache = cache or ExecutableCache(None)

    self.rep = replicated_sharding
    stacked = lead(per_device_sharding)
    jitted = jax.jit(_migrate_stack, donate_argnums=(0, 1), out_shardings=(stacked, stacked))
    self._programs = {}                       # (stack shape, bucket) -> program
    self._sizes = {}                          # stack shape -> elements per layer (padding's)
    for struct, most in ((stack_struct, max_elements),) + tuple(more):
      size = int(np.prod(struct.shape[1:]))
      if size >= 2 ** 31:
        raise ValueError("KV pools over 2^31 elements per layer need 64-bit migration indices")
      self._sizes[tuple(struct.shape)] = size
      pool = jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=stacked)
      for m in buckets(most):
        idx = jax.ShapeDtypeStruct((m,), jnp.int32, sharding=replicated_sharding)
        key = ("migrate", tuple(struct.shape), str(struct.dtype), m,
               tuple(stacked.mesh.shape.items()))
        lower = lambda pool=pool, idx=idx: jitted.lower(pool, pool, idx, idx, idx, idx)
        self._programs[(tuple(struct.shape), m)] = cache.get_or_compile(key, lower,
                                                                        stacked.mesh)[0]

  def __len__(self):
    return len(self._programs)

  def move(self, device_pools, arch: Architecture, src: Placement, dst: Placement, n_tokens: int,
           pages_per_device: int, slots: int, start: int = 0, space: int = 0) -> int:
    """Re-lay tokens [start, n_tokens) of a sequence from `src` to `dst` in every layer of page
    space `space` (whose pools hold `pages_per_device`); returns the elements moved per layer
    (K and V each)."""
    idx = migration_indices(arch, src, dst, n_tokens, pages_per_device, slots, start)
    return self.run(device_pools.k, device_pools.v, space, idx)

  def run(self, k_stacks: list, v_stacks: list, space: int, indices) -> int:
    """Move one sequence's KV in every layer of the stacks `k_stacks[space]`,
    `v_stacks[space]` (replaced by the results); returns the elements moved per layer."""
    shape = tuple(k_stacks[space].shape)
    n = len(indices[0])
    if not n:
      return 0
    m = next((b for s, b in self._programs if s == shape and b >= n), None)
    if m is None:
      raise ValueError(f"a migration of {n} elements exceeds the largest compiled bucket")
    padded = []
    for i, a in enumerate(indices):
      fill = 0 if i % 2 == 0 else self._sizes[shape]      # sources read 0, padding writes drop
      buf = np.full(m, fill, np.int32)
      buf[:n] = a
      padded.append(buf)
    args = jax.device_put(padded, self.rep)
    k_stacks[space], v_stacks[space] = self._programs[(shape, m)](k_stacks[space],
                                                                 v_stacks[space], *args)
    return n
