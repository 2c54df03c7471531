"""A page space: a pool of page ids and the page table each sequence holds in it.

Every model has one, whose table its layers read (`Sequence.kv`); a hybrid model (Gemma 3) has a
second one for its sliding-window layers (`Sequence.local`), with pools of their own. A space
under a window (an all-sliding model's only space, a hybrid model's sliding one) keeps in a
sequence's table only the entries a later query still reads (`kv.window`): at the start of each
step the entries wholly before the window point at the null page and their pages become spare; a
decoding sequence gives its spare pages back at once, a prefilling one keeps them for the chunks
ahead. Pure host logic, no JAX.
"""

from __future__ import annotations

from flying_jax.engine.sequence import PageTable, Sequence
from flying_jax.kv import NULL_PAGE, PageLayout, PagePool
from flying_jax.kv import window as kw


class PageSpace:
  """One page space of a scheduler: its pool, its window (0: keep every page) and which of a
  sequence's tables it holds (`attr`: "kv" or "local")."""

  def __init__(self, pool: PagePool, window: int, longest_row: int, attr: str = "kv"):
    self.pool, self.window, self.attr = pool, window, attr
    self._longest_row = longest_row

  def table(self, seq: Sequence) -> PageTable:
    return getattr(seq, self.attr)

  # how many pages -----------------------------------------------------------------------------
  def first_live(self, computed: int, layout: PageLayout) -> int:
    """The first table entry a query at position `computed` or later still reads."""
    return kw.first_live(computed, self.window, layout.tokens_per_page) if self.window else 0

  def peak_pages(self, layout: PageLayout) -> int:
    """Under a window, the most pages one step reads for a sequence (`kv.window.peak_pages`)."""
    return kw.peak_pages(self.window, self._longest_row, layout.tokens_per_page)

  def pages_needed(self, seq: Sequence, layout: PageLayout, computed: int | None = None) -> int:
    """Pages `seq` holds when placed under `layout` with `computed` tokens of KV (default its
    own): its whole length, or under a window what the rest of its run reads at once."""
    n = layout.pages_for(seq.length)
    if not self.window:
      return n
    computed = seq.computed if computed is None else computed
    return min(n - self.first_live(computed, layout), self.peak_pages(layout))

  def fits(self, seq: Sequence, first_device: int, layout: PageLayout) -> bool:
    """Whether the group at `first_device` under `layout` has the pages `seq` needs now."""
    return self.pool.free_count(first_device, layout.width) >= self.pages_needed(seq, layout)

  def needs_page(self, seq: Sequence) -> bool:
    """Whether the table lacks the entry of the token `seq` writes next."""
    return seq.layout.pages_for(seq.computed + 1) > len(self.table(seq).pages)

  def covered(self, seq: Sequence) -> int:
    """Tokens the table has entries for (from position 0)."""
    return len(self.table(seq).pages) * seq.layout.tokens_per_page

  # pages in and out ---------------------------------------------------------------------------
  def admit(self, seq: Sequence):
    """A fresh table for `seq` (placed, nothing computed): the pages its first steps read."""
    pages = self.pool.allocate(seq.first_device, seq.layout.width,
                               self.pages_needed(seq, seq.layout, 0))
    setattr(seq, self.attr, PageTable(pages))

  def release(self, seq: Sequence):
    held = self.table(seq).take()
    if held:
      self.pool.release(seq.first_device, seq.layout.width, held)

  def map(self, seq: Sequence, tokens: int, pool: bool = True):
    """Table entries for `seq`'s first `tokens` tokens: its spare pages first, then (if `pool`)
    the pool's (PoolExhausted: the table is left as far as the spare pages reached)."""
    t = self.table(seq)
    need = seq.layout.pages_for(tokens) - len(t.pages)
    while need > 0 and t.spare:
      t.pages.append(t.spare.pop())
      need -= 1
    if need > 0 and pool:
      t.pages += self.pool.allocate(seq.first_device, seq.layout.width, need)

  def drop_passed(self, seq: Sequence):
    """Move the pages wholly before `seq`'s window from its table to its spare pages."""
    t = self.table(seq)
    first = min(self.first_live(seq.computed, seq.layout), len(t.pages))
    if first > t.dropped:
      t.spare += t.pages[t.dropped:first]
      t.pages[t.dropped:first] = [NULL_PAGE] * (first - t.dropped)
      t.dropped = first

  def free_passed(self, seq: Sequence):
    """Drop a running sequence's passed pages; a decoding one gives them back to the pool (after
    taking one for the token it writes, when it crosses into a new page)."""
    self.drop_passed(seq)
    t = self.table(seq)
    if seq.is_decoding and t.spare:
      self.map(seq, seq.computed + 1, pool=False)
      if t.spare:
        self.pool.release(seq.first_device, seq.layout.width, t.spare)
        t.spare = []
