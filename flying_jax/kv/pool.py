"""KV pages: one pool per device whose physical shape never changes, and how pages are read.

Each device holds, per layer, K and V arrays of `[pages, slots, hd]` with `slots = page_tokens *
n_kv_heads` (the layers of one page space stacked, `DevicePools`). A request prefilled in a width-w group owns the same page ids on each of the group's
devices and reads them under its `PageLayout`: `kv_per_device` heads, `slots // kv_per_device`
tokens per page. Page 0 of every device is the null page: padding tokens write there, and no
real token's attention reads it unmasked.

A sequence's page table is indexed by token position (entry i holds tokens [i*T, (i+1)*T)). Under
a model whose every layer slides, the entries wholly before the sequence's window go back to the
pool while it runs and point at the null page; every key there is outside the window of every
query still to come, so attention masks it whatever the null page holds. A hybrid model's
sliding-window layers read such a windowed table in a page space of their own (smaller pools, a
`PagePool` of their own) while its global layers read the sequence's full table (`kv.window`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


NULL_PAGE = 0          # padding writes here; a freed entry of a page table points here


class PoolExhausted(RuntimeError):
  """Not enough free pages on the devices of a group right now."""


@dataclasses.dataclass(frozen=True)
class PageLayout:
  """The interpretation of a request's pages: held with the request, not with the pool."""
  width: int
  kv_per_device: int
  tokens_per_page: int
  base: int = 1          # devices per engine: which device of the group holds which heads

  def pages_for(self, tokens: int) -> int:
    return -(-tokens // self.tokens_per_page)


class PagePool:
  """Host page tables: which page ids are free on which device (and how many are used).

  A page is free, used (a sequence's table holds it) or parked: kept by the prefix cache
  (`kv.prefix`) with its bytes for a later request, used by none. Parked pages count as free in
  `free_count` and `used_share`; `allocate` reclaims them (`reclaim`, the cache's eviction) when
  the free ones do not suffice."""

  def __init__(self, devices: int, pages: int):
    if pages < 2:
      raise ValueError("a KV pool needs at least 2 pages per device (page 0 is the null page)")
    self.devices, self.pages = devices, pages
    self._free = np.ones((devices, pages), bool)
    self._free[:, 0] = False
    self._parked = np.zeros((devices, pages), bool)
    self._used = np.zeros(devices, np.int64)
    self._total = 0
    self.parked = 0                             # parked pages (counted once per placement)
    self.reclaim = None    # (first, width, n): frees parked pages until n are free there, if it can

  def _row(self, first: int, width: int) -> np.ndarray:
    return self._free[first] if width == 1 else self._free[first:first + width].all(axis=0)

  def free_count(self, first: int, width: int) -> int:
    """Pages allocatable on every device [first, first + width), parked ones included."""
    if width == 1:
      return self.pages - 1 - int(self._used[first])
    if not self.parked:
      return int(self._row(first, width).sum())
    span = slice(first, first + width)
    return int((self._free[span] | self._parked[span]).all(axis=0).sum())

  def allocate(self, first: int, width: int, n: int) -> list[int]:
    """n page ids free on all devices [first, first + width); marks them used."""
    if n == 0:
      return []
    row = self._row(first, width)
    if self.parked and self.reclaim is not None and int(row.sum()) < n:
      self.reclaim(first, width, n)
      row = self._row(first, width)
    if n == 1:                                  # a decode crossing a page: the first free one
      i = int(row.argmax())
      ids = [i] if row[i] else []
    else:
      ids = np.flatnonzero(row)[:n].tolist()
    if len(ids) < n:
      raise PoolExhausted(f"{n} pages wanted on devices {first}..{first + width - 1}, "
                          f"{int(row.sum())} free")
    self._free[first:first + width, ids] = False
    self._used[first:first + width] += n
    self._total += n * width
    return ids

  def release(self, first: int, width: int, ids: list[int]):
    if not ids:
      return
    idx = np.asarray(ids)
    span = slice(first, first + width)
    if self._free[span, idx].any() or self._parked[span, idx].any():
      raise AssertionError(f"double free of pages {ids} on devices {first}..{first + width - 1}")
    self._free[span, idx] = True
    self._used[span] -= len(ids)
    self._total -= len(ids) * width

  # the prefix cache's pages -------------------------------------------------------------------
  def park(self, first: int, width: int, ids: list[int]):
    """Used pages that no table holds any more, kept for the prefix cache."""
    span = slice(first, first + width)
    self._parked[span, ids] = True
    self._used[span] -= len(ids)
    self._total -= len(ids) * width
    self.parked += len(ids)

  def unpark(self, first: int, width: int, ids: list[int]):
    """Parked pages a table holds again (a prefix cache hit)."""
    span = slice(first, first + width)
    self._parked[span, ids] = False
    self._used[span] += len(ids)
    self._total += len(ids) * width
    self.parked -= len(ids)

  def drop(self, first: int, width: int, ids: list[int]):
    """Parked pages evicted: free again."""
    span = slice(first, first + width)
    self._parked[span, ids] = False
    self._free[span, ids] = True
    self.parked -= len(ids)

  def free_now(self, first: int, width: int) -> int:
    """Pages free on every device [first, first + width) without evicting parked ones."""
    return int(self._row(first, width).sum())

  def used_fraction(self) -> np.ndarray:
    """Per device, the share of allocatable pages in use (parked pages are not in use)."""
    return self._used / (self.pages - 1)

  def used_share(self) -> float:
    """The share of allocatable pages in use, over all devices."""
    return self._total / (self.devices * (self.pages - 1))

  def all_free(self) -> bool:
    """No page in use (parked pages may remain: they belong to no request)."""
    return self._total == 0


@dataclasses.dataclass
class DevicePools:
  """The device arrays: K and V of each page space, every layer of a space in one stack of
  global shape `[layers, devices * pages, slots, hd]`, split over the devices along axis 1 (each
  device holds `[layers, pages, slots, hd]`; programs walk the layer axis, `model.decoder`).

  One page space holds every layer, except in a hybrid model, whose sliding-window layers keep
  their KV in a second space of `local_pages` per device (`kv.window`)."""
  k: list                     # per page space
  v: list
  layers: tuple               # per page space: its layers, in stack order

  @staticmethod
  def create(spaces, devices: int, slots: int, head_dim: int, dtype,
             sharding) -> "DevicePools":
    """Zeroed pools of `spaces` ((layers, pages per device) each) over `devices`; `sharding`:
    one layer's pool split over the devices along its leading axis."""
    from flying_jax.model.weights import lead

    def zeros(n, pages):
      shape = (n, devices * pages, slots, head_dim)
      return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=lead(sharding))()
    return DevicePools([zeros(len(ls), p) for ls, p in spaces],
                       [zeros(len(ls), p) for ls, p in spaces], tuple(ls for ls, _ in spaces))

  def struct(self, space: int = 0) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(self.k[space].shape, self.k[space].dtype)

  def device_struct(self, devices: int, space: int = 0) -> jax.ShapeDtypeStruct:
    """One device's stacked pools of `space`."""
    n, rows, slots, hd = self.k[space].shape
    return jax.ShapeDtypeStruct((n, rows // devices, slots, hd), self.k[space].dtype)

  def space_of(self, layer: int) -> tuple[int, int]:
    """(page space, entry in its stack) of decoder layer `layer`."""
    for space, ls in enumerate(self.layers):
      if layer in ls:
        return space, ls.index(layer)
    raise IndexError(layer)

  def nbytes(self) -> int:
    return sum(a.nbytes for a in self.k + self.v)
