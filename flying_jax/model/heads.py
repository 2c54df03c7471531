"""Which attention heads each device of a width-w group computes, with exact zero padding.

A width-w group splits the KV heads over its devices; every device holds its KV heads and the query
heads that read them, so attention never crosses devices. When the KV heads do not divide w, the
missing slots are padding (index -1: zero weights, zero output); when w is larger than the number of
KV heads, each KV head is replicated on `w / kv_pad` devices and its query heads are split among them.

Every device reads its heads as ONE contiguous run of rows of the resident projections (query
heads in their natural order, kv-major; KV heads likewise): rows `q_start[d] : q_start[d] +
q_per_device` and `kv_start[d] : kv_start[d] + kv_per_device`, a dynamic slice along the leading
axis that no width turns into a gather. Rows past the real heads are exact zeros (the resident
arrays are padded to `weight_rows`); where a width splits a KV head's query heads unevenly, a run
may cover a neighbour's real head, which `q_mask` zeroes before the output projection.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from flying_jax.config import Architecture


@dataclasses.dataclass(frozen=True)
class HeadPlan:
  """Head assignment for one width. Index -1 marks a padded (all-zero) head."""
  width: int
  kv_per_device: int
  q_per_kv: int                   # query heads per KV head on one device (padded group size)
  q_index: np.ndarray             # [width, kv_per_device * q_per_kv] global query head, or -1
  kv_index: np.ndarray            # [width, kv_per_device] global KV head, or -1
  q_start: np.ndarray             # [width] first query row each device reads
  kv_start: np.ndarray            # [width] first KV row each device reads
  n_heads: int = 0                # real query heads (rows below it are real, above it zeros)
  reads: "ShardReads | None" = None   # where each rank's rows sit in its device's resident shard

  @property
  def q_rows_needed(self) -> int:
    return int(self.q_start.max()) + self.q_per_device

  @property
  def kv_rows_needed(self) -> int:
    return int(self.kv_start.max()) + self.kv_per_device

  @property
  def q_mask(self) -> np.ndarray | None:
    """[width, q_per_device] 1 where a read row is this device's head; None when every other row
    read is a zero padding row (nothing to mask)."""
    rows = self.q_start[:, None] + np.arange(self.q_per_device)[None, :]
    mine = rows == self.q_index
    if np.all(mine | (rows >= self.n_heads)):
      return None
    return mine.astype(np.float32)

  @property
  def q_per_device(self) -> int:
    return self.kv_per_device * self.q_per_kv

  @property
  def is_identity(self) -> bool:
    """Width 1 with no padding: the program uses the resident weights as they are."""
    return self.width == 1 and bool((self.q_index >= 0).all()) and bool((self.kv_index >= 0).all())

  def padded_q_heads(self) -> int:
    return int((self.q_index < 0).sum())

  def kv_head_copies(self) -> int:
    """KV head slots over the group (padding and replicas included)."""
    return self.width * self.kv_per_device


def plan_heads(arch: Architecture, width: int) -> HeadPlan:
  hkv, g = arch.n_kv_heads, arch.group_size
  if width <= hkv:
    kvpd, rep, gpd = math.ceil(hkv / width), 1, g
  else:
    kv_pad = next(d for d in range(hkv, width + 1) if width % d == 0)
    kvpd, rep = 1, width // kv_pad
    gpd = math.ceil(g / rep)
  q_index = np.full((width, kvpd * gpd), -1, np.int32)
  kv_index = np.full((width, kvpd), -1, np.int32)
  for d in range(width):
    for s in range(kvpd):
      kv = (d // rep) * kvpd + s
      if kv >= hkv:
        continue
      kv_index[d, s] = kv
      part = d % rep
      for j in range(gpd):
        qi = part * gpd + j
        if qi < g:
          q_index[d, s * gpd + j] = kv * g + qi
  if width <= hkv:
    q_start = np.arange(width) * kvpd * g
    kv_start = np.arange(width) * kvpd
  else:
    kv_of, part = np.arange(width) // rep, np.arange(width) % rep
    q_start, kv_start = kv_of * g + part * gpd, kv_of
  plan = HeadPlan(width, kvpd, gpd, q_index, kv_index, q_start.astype(np.int32),
                  kv_start.astype(np.int32), arch.n_heads)
  _check(plan, arch)
  return plan


@dataclasses.dataclass(frozen=True)
class RowBlocks:
  """The rows each device of an engine (base width t) holds: shard j of the query-head rows is
  rows `q_lo[j] : q_lo[j] + q_size` of the padded head order (zeros past the real heads), the
  same for KV heads; FFN columns split evenly. Every rank's run at every compiled width lies
  inside its device's shard (ranks nest: rank r of a width m*t group is on shard r // m)."""
  base: int
  q_lo: tuple[int, ...]
  q_size: int
  kv_lo: tuple[int, ...]
  kv_size: int
  vocab: bool = False             # embeddings split over the engine's devices by vocabulary rows

  @property
  def rows(self) -> tuple[int, int]:
    """(query, KV) head rows of one device's shard."""
    return self.q_size, self.kv_size

  @staticmethod
  def single(rows: tuple[int, int]) -> "RowBlocks":
    """An engine of one device holding `rows` (query, KV) head rows."""
    return RowBlocks(1, (0,), int(rows[0]), (0,), int(rows[1]))


def row_blocks(arch: Architecture, widths, base: int = 1) -> RowBlocks:
  """The smallest shards that hold every compiled width's runs (`widths` multiples of `base`);
  the embeddings are split by vocabulary rows when every width divides the vocabulary."""
  if base == 1:
    return RowBlocks.single(weight_rows(arch, widths))
  q_runs, kv_runs = [[] for _ in range(base)], [[] for _ in range(base)]
  for w in widths:
    if w % base:
      raise ValueError(f"width {w} is not a multiple of the base width {base}")
    plan, m = plan_heads(arch, w), w // base
    for r in range(w):
      q_runs[r // m].append((int(plan.q_start[r]), int(plan.q_start[r]) + plan.q_per_device))
      kv_runs[r // m].append((int(plan.kv_start[r]), int(plan.kv_start[r]) + plan.kv_per_device))
  lo = lambda runs: tuple(min(a for a, _ in rs) for rs in runs)
  size = lambda runs: max(max(b for _, b in rs) - min(a for a, _ in rs) for rs in runs)
  vocab = all(arch.vocab_size % w == 0 for w in widths)
  return RowBlocks(base, lo(q_runs), size(q_runs), lo(kv_runs), size(kv_runs), vocab)


@dataclasses.dataclass(frozen=True)
class ShardReads:
  """Where each rank of one width reads its rows inside its device's shard: query / KV head
  rows from `q[r]` / `kv[r]` (in heads), FFN columns from `ffn[r]`; `whole`: every rank reads its
  whole shard (an engine's own width: its real heads first, zero rows after)."""
  q: tuple[int, ...]
  kv: tuple[int, ...]
  ffn: tuple[int, ...]
  ffn_size: int
  whole: bool
  vocab: bool = False             # the embeddings are split (`RowBlocks.vocab`)


def shard_reads(plan: HeadPlan, blocks: RowBlocks, ffn_dim: int) -> HeadPlan:
  """`plan` with its `reads` in the shards of `blocks`."""
  w, t = plan.width, blocks.base
  m = w // t
  q = tuple(int(plan.q_start[r]) - blocks.q_lo[r // m] for r in range(w))
  kv = tuple(int(plan.kv_start[r]) - blocks.kv_lo[r // m] for r in range(w))
  f = ffn_dim // w
  ffn = tuple((r % m) * f for r in range(w))
  for r in range(w):
    if not (0 <= q[r] and q[r] + plan.q_per_device <= blocks.q_size and 0 <= kv[r]
            and kv[r] + plan.kv_per_device <= blocks.kv_size):
      raise AssertionError(f"rank {r} of width {w} reads outside its shard")
  whole = m == 1 and not any(q) and not any(kv)
  return dataclasses.replace(plan, reads=ShardReads(q, kv, ffn, f, whole, blocks.vocab))


def weight_rows(arch: Architecture, widths) -> tuple[int, int]:
  """(query rows, KV rows) the resident projections are padded to so that every width's runs
  stay inside them (the extra rows are zeros)."""
  plans = [plan_heads(arch, w) for w in widths]
  return (max([arch.n_heads] + [p.q_rows_needed for p in plans]),
          max([arch.n_kv_heads] + [p.kv_rows_needed for p in plans]))


def _check(plan: HeadPlan, arch: Architecture):
  """Every real query head is computed exactly once, next to its own KV head, inside the device's
  contiguous runs of rows."""
  q = plan.q_index[plan.q_index >= 0]
  if sorted(q.tolist()) != list(range(arch.n_heads)):
    raise AssertionError(f"head plan for width {plan.width} does not cover each query head once")
  for d in range(plan.width):
    for slot, h in enumerate(plan.q_index[d]):
      if h >= 0 and plan.kv_index[d, slot // plan.q_per_kv] != h // arch.group_size:
        raise AssertionError(f"query head {h} placed away from its KV head at width {plan.width}")
      if h >= 0 and h != plan.q_start[d] + slot:
        raise AssertionError(f"query head {h} outside device {d}'s run at width {plan.width}")
    for slot, kv in enumerate(plan.kv_index[d]):
      if kv >= 0 and kv != plan.kv_start[d] + slot:
        raise AssertionError(f"KV head {kv} outside device {d}'s run at width {plan.width}")
      if kv < 0 and plan.kv_start[d] + slot < arch.n_kv_heads:
        raise AssertionError(f"a padded KV slot of device {d} reads a real head at width "
                             f"{plan.width}")


def padding_report(arch: Architecture, width: int, rows: tuple[int, int] | None = None) -> dict:
  """Extra attention FLOPs and KV bytes that padding and replication cost at this width (width 1
  multiplies every row of the resident layout, `rows` = `weight_rows`, zero rows included)."""
  plan = plan_heads(arch, width)
  hd, dim = arch.head_dim, arch.dim
  real = (arch.n_heads + 2 * arch.n_kv_heads) * hd * dim + arch.n_heads * hd * dim
  nq, nkv = (plan.q_per_device, plan.kv_per_device) if width > 1 or rows is None else rows
  padded = width * ((nq + 2 * nkv) * hd * dim + nq * hd * dim)
  return {
      "width": width,
      "q_heads_per_device": plan.q_per_device,
      "kv_heads_per_device": plan.kv_per_device,
      "padded_q_heads": plan.padded_q_heads(),
      "attn_proj_flops_extra": padded / real - 1.0,
      "kv_bytes_per_token_extra": plan.kv_head_copies() / arch.n_kv_heads - 1.0,
  }
