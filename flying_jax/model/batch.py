"""The step batch of one group: `decode` sequences with one token each, then prefill chunks.

Prefill comes as `prefill_rows` rows of `chunk` tokens, one sequence per row (one long chunk, or
several short prompts side by side).

On the host it is packed into a single int32 row per group (one transfer per step, the sampling
fields in front: `HostBatch`); inside the program `unpack` cuts it into named arrays.
`StepShape` is the static part (the program bucket).
A hybrid model's steps also carry its sliding layers' page tables and write slots
(`StepShape.local_tables`), which those layers read instead (`StepMeta.local_view`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, order=True)
class StepShape:
  decode: int            # decode slots D (sequences contributing one token)
  chunk: int             # prefill tokens per row C, 0 for none
  max_pages: int         # page-table columns M
  prefill_rows: int = 1  # prefill rows R (sequences prefilled side by side)
  local_tables: bool = False   # also the sliding layers' own page tables (a hybrid model)

  def __post_init__(self):
    if self.chunk and self.prefill_rows < 1:
      raise ValueError("a step shape with a prefill chunk needs at least one prefill row")

  @property
  def pre_rows(self) -> int:
    return self.prefill_rows if self.chunk else 0

  @property
  def tokens(self) -> int:
    return self.decode + self.pre_rows * self.chunk

  @property
  def rows(self) -> int:
    """Rows sampled: one per decode slot, plus the last token of each prefill row."""
    return self.decode + self.pre_rows

  def sampled_row(self, i: int, prefill: bool) -> int:
    """The sampled row of the i-th decode slot, or of the i-th prefill row."""
    return self.decode + i if prefill else i

  def _fields(self) -> list[tuple[str, tuple[int, ...]]]:
    t, d, m, r = self.tokens, self.decode, self.max_pages, self.pre_rows
    return [("tokens", (t,)), ("positions", (t,)), ("write_base", (t,)),
            ("dec_table", (d, m)), ("dec_len", (d,)), ("pre_table", (r, m)), ("pre_len", (r,)),
            ("n_blocks", (2,)), ("rows", (self.rows,)), ("feed", (d,))] + (
                [("local_write_base", (t,)), ("local_dec_table", (d, m)),
                 ("local_pre_table", (r, m))] if self.local_tables else [])

  @property
  def packed_len(self) -> int:
    return sum(int(np.prod(s)) for _, s in self._fields())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepMeta:
  tokens: jax.Array       # [T] token ids
  positions: jax.Array    # [T] absolute positions
  write_base: jax.Array   # [T] first pool slot of each token's KV (padding -> the null page)
  dec_table: jax.Array    # [D, M] page ids of the decode sequences
  dec_len: jax.Array      # [D] KV length after this step (0 for an empty slot)
  pre_table: jax.Array    # [R, M] page ids of each prefill row's sequence
  pre_len: jax.Array      # [R] KV length after this step's chunk
  n_blocks: jax.Array     # [2] attention blocks to visit: decode, prefill
  rows: jax.Array         # [R] token index of each sampled row
  feed: jax.Array         # [D] 0: the decode slot's token is in `tokens`; k > 0: it is the
  #                         previous step's sampled row k - 1 (still on the device, `fed`)
  # a hybrid model's sliding layers read pools of their own through tables of their own (the
  # window only; entries before it point at the null page), same shapes as those above:
  local_write_base: jax.Array | None = None
  local_dec_table: jax.Array | None = None
  local_pre_table: jax.Array | None = None

  def fed(self, prev_R) -> "StepMeta":
    """The step with each decode slot whose token the previous step sampled (`feed`) reading
    it from that step's sampled ids `prev_R`, which never went through the host."""
    d = self.feed.shape[0]
    if not d:
      return self
    feed = self.feed
    from_prev = jnp.take(prev_R, jnp.maximum(feed - 1, 0), axis=0)
    tokens = self.tokens.at[:d].set(jnp.where(feed > 0, from_prev, self.tokens[:d]))
    return dataclasses.replace(self, tokens=tokens)

  def local_view(self) -> "StepMeta":
    """The step as a sliding layer of a hybrid model reads it: its own tables and slots."""
    return dataclasses.replace(self, write_base=self.local_write_base,
                               dec_table=self.local_dec_table, pre_table=self.local_pre_table)

  def at_layer(self, first_page, slots: int) -> "StepMeta":
    """The step as one layer of a stacked pool reads it: that pool viewed as `[layers * pages,
    slots, hd]`, the layer's pages from `first_page` on (page ids and write slots shifted; the
    null page becomes the layer's own page 0)."""
    return dataclasses.replace(self, write_base=self.write_base + first_page * slots,
                               dec_table=self.dec_table + first_page,
                               pre_table=self.pre_table + first_page)


def unpack(packed_L, shape: StepShape) -> StepMeta:
  out, at = {}, 0
  for name, s in shape._fields():
    n = int(np.prod(s))
    out[name] = packed_L[at:at + n].reshape(s)
    at += n
  return StepMeta(**out)


class HostBatch:
  """Numpy builder of the packed rows of all groups for one step: `lead` words in front of each
  group's row (the executor's sampling fields), then the named fields (views into `packed`)."""

  def __init__(self, groups: int, shape: StepShape, lead: int = 0):
    self.shape = shape
    self.packed = np.zeros((groups, lead + shape.packed_len), np.int32)
    self.lead = self.packed[:, :lead]
    self.fields, at = {}, lead
    for name, s in shape._fields():
      n = int(np.prod(s))
      self.fields[name] = self.packed[:, at:at + n].reshape((groups,) + s)
      at += n


def meta_struct(groups: int, shape: StepShape, sharding, lead: int = 0) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((groups, lead + shape.packed_len), jnp.int32, sharding=sharding)
