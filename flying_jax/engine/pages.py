"""A page space: a pool of page ids and the page table each sequence holds in it.

Every model has one, whose table its layers read (`Sequence.kv`); a hybrid model (Gemma 3) has a
second one for its sliding-window layers (`Sequence.local`), with pools of their own. A space
under a window (an all-sliding model's only space, a hybrid model's sliding one) keeps in a
sequence's table only the entries a later query still reads (`kv.window`): at the start of each
step the entries wholly before the window point at the null page and their pages become spare; a
decoding sequence gives its spare pages back at once, a prefilling one keeps them for the chunks
ahead.

The space every layer reads of a model without sliding layers may share full pages between
sequences through a prefix cache (`kv.prefix`): a sequence admitted to a group takes the cached
pages its tokens start with and computes from the first token they lack, its own full pages are
named in the cache as they fill, and a page it gives back that the cache named is parked (kept
with its bytes, evicted least-recently-used when a group lacks pages). Pure host logic, no JAX.
"""

from __future__ import annotations

from flying_jax.engine.sequence import PageTable, Sequence
from flying_jax.kv import NULL_PAGE, PageLayout, PagePool
from flying_jax.kv import window as kw
from flying_jax.kv.prefix import ROOT, PrefixCache, page_names


class PageSpace:
  """One page space of a scheduler: its pool, its window (0: keep every page) and which of a
  sequence's tables it holds (`attr`: "kv" or "local")."""

  def __init__(self, pool: PagePool, window: int, longest_row: int, attr: str = "kv",
               cache: PrefixCache | None = None):
    if cache is not None and window:
      raise ValueError("a page space under a window keeps no prefix cache")
    self.pool, self.window, self.attr, self.cache = pool, window, attr, cache
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

  def fits(self, seq: Sequence, first_device: int, layout: PageLayout, hits: list[int] = ()) -> bool:
    """Whether the group at `first_device` under `layout` has the pages `seq` needs now, beside
    the cached pages `hits` it would take (`cached`)."""
    free = self.pool.free_count(first_device, layout.width)
    if hits:                                 # parked hits are counted free: they are not new
      free -= self.cache.parked_among(first_device, layout, hits)
    return free >= self.pages_needed(seq, layout) - len(hits)

  def needs_page(self, seq: Sequence) -> bool:
    """Whether the table lacks the entry of the token `seq` writes next."""
    return seq.layout.pages_for(seq.computed + 1) > len(self.table(seq).pages)

  def covered(self, seq: Sequence) -> int:
    """Tokens the table has entries for (from position 0)."""
    return len(self.table(seq).pages) * seq.layout.tokens_per_page

  # the prefix cache ---------------------------------------------------------------------------
  def _names(self, seq: Sequence, tpp: int, pages: int) -> list[int]:
    """The cache's names of `seq`'s first `pages` full pages (computed once, then extended)."""
    known, names = seq.page_names
    if known != tpp:
      names = []
    if len(names) < pages:
      parent = names[-1] if names else ROOT
      names = names + page_names(seq.tokens(0, pages * tpp), tpp, len(names), parent)
      seq.page_names = (tpp, names)
    return names

  def cached(self, seq: Sequence, first_device: int, layout: PageLayout) -> list[int]:
    """The cached pages `seq`'s tokens start with in the group at `first_device` under `layout`
    (two tokens at least are left to compute: it prefills, and samples its last one's logits)."""
    if self.cache is None or not self.cache.holds(first_device, layout):
      return []                          # no token list built for a placement with nothing
    tpp = layout.tokens_per_page
    pages = (seq.length - 2) // tpp        # two tokens at least are left: a prefill samples
    if pages <= 0:
      return []
    return self.cache.match(first_device, layout, seq.tokens(0, pages * tpp),
                            self._names(seq, tpp, pages))

  def name_full(self, seq: Sequence):
    """Name in the cache the pages of `seq`'s table that are full: every token computed (its
    step launched: a step that reads them runs after it on the same devices) and known on the
    host (not a sampled token still on the device)."""
    t, tpp = self.table(seq), seq.layout.tokens_per_page
    full = min(seq.computed, seq.prompt_len + len(seq.output_ids), len(t.pages) * tpp) // tpp
    if t.named >= full:
      return
    names = self._names(seq, tpp, full)
    for i in range(t.named, full):
      parent = t.chain if i else ROOT
      self.cache.register(seq.first_device, seq.layout, names[i], parent,
                          tuple(seq.tokens(i * tpp, (i + 1) * tpp)), t.pages[i])
      t.chain = names[i]
    t.named = full

  # pages in and out ---------------------------------------------------------------------------
  def admit(self, seq: Sequence, hits: list[int] = ()):
    """A fresh table for `seq` (placed): the cached pages `hits` its tokens start with (`cached`),
    then pages for what its first steps compute."""
    first, layout = seq.first_device, seq.layout
    if hits:
      self.cache.acquire(first, layout, hits)
    pages = list(hits) + self.pool.allocate(first, layout.width,
                                            self.pages_needed(seq, layout, 0) - len(hits))
    table = PageTable(pages)
    if hits:
      table.named, table.chain = len(hits), seq.page_names[1][len(hits) - 1]
    setattr(seq, self.attr, table)

  def release(self, seq: Sequence, discard: bool = False):
    """Give back every page `seq` holds (`discard`: its pages' bytes are not to be trusted, a
    failed step: those only it holds leave the cache)."""
    self.give_back(seq.first_device, seq.layout.width if seq.layout else 0,
                   self.table(seq).take(), discard)

  def give_back(self, first: int, width: int, pages: list[int], discard: bool = False):
    if not pages:
      return
    if self.cache is not None:
      pages = self.cache.release(first, width, pages, discard)
    self.pool.release(first, width, pages)

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
