"""Automatic prefix caching: full KV pages shared between requests that start with the same tokens.

A full page (its `tokens_per_page` tokens computed) is named by a hash chain: the hash of its
tokens and of the name of the page before it, so equal names mean equal tokens from position 0
(each entry also keeps its tokens and its parent's name, compared on every hit: a hash collision
is a miss, never wrong KV). A page's bytes depend on how the group that wrote it lays tokens out
(`PageLayout`: the width, the heads each device holds, tokens per page) and on which devices hold
it, so the cache is kept per placement, `(first device, layout)`: a request placed in a group
finds the pages that group's placement wrote. A partition switch changes no byte and no name: a
width-8 group's pages wait, parked, while the engine serves width 1, and hit again when it
returns; a sequence that migrates or recomputes leaves its cached pages behind and its new pages
join the new placement's cache once full.

Pages are shared by reference count. A page no table holds any more stays parked in the pool
(`PagePool.park`: counted free, bytes kept); when a group needs pages and the free ones do not
suffice, parked pages are evicted least-recently-used first (the pages a sequence gives back go
in tail first, so a chain is evicted from its end). Pure host logic, no JAX.
"""

from __future__ import annotations

import collections
import dataclasses

from flying_jax.kv.pool import PageLayout, PagePool

ROOT = 0x5EED                          # the parent name of a sequence's first page


def page_names(tokens: list[int], tokens_per_page: int, start: int = 0,
               parent: int = ROOT) -> list[int]:
  """The chain names of the full pages of `tokens`, from page `start` whose parent is named
  `parent`."""
  names = []
  for i in range(start, len(tokens) // tokens_per_page):
    parent = hash((parent, tuple(tokens[i * tokens_per_page:(i + 1) * tokens_per_page])))
    names.append(parent)
  return names


@dataclasses.dataclass(eq=False)
class _Entry:
  place: tuple                         # (first device, layout)
  name: int
  parent: int
  tokens: tuple
  page: int
  refs: int


class PrefixCache:
  """The cached pages of one page pool, per placement; hit and query counts in tokens."""

  def __init__(self, pool: PagePool):
    self.pool = pool
    self._names: dict[tuple, dict[int, _Entry]] = collections.defaultdict(dict)
    self._pages: dict[tuple[int, int, int], _Entry] = {}     # (first, width, page) -> entry
    self._lru: collections.OrderedDict[int, _Entry] = collections.OrderedDict()  # parked ones
    self.queried_tokens = 0            # prompt tokens looked up (first admission of a sequence)
    self.hit_tokens = 0                # of which found
    self.evicted = 0
    pool.reclaim = self.reclaim

  # lookups -------------------------------------------------------------------------------------
  def match(self, first: int, layout: PageLayout, tokens: list[int], names: list[int]) -> list[int]:
    """The cached pages of the longest prefix of `tokens` (page names `names`) in the
    placement: their page ids, in order. Takes nothing."""
    table = self._names.get((first, layout))
    if not table:
      return []
    tpp, parent, pages = layout.tokens_per_page, ROOT, []
    for i, name in enumerate(names):
      e = table.get(name)
      if e is None or e.parent != parent or e.tokens != tuple(tokens[i * tpp:(i + 1) * tpp]):
        break
      pages.append(e.page)
      parent = name
    return pages

  def holds(self, first: int, layout: PageLayout) -> bool:
    """Whether the placement has any named page (a lookup there can hit)."""
    return bool(self._names.get((first, layout)))

  def parked_among(self, first: int, layout: PageLayout, pages: list[int]) -> int:
    """How many of `pages` (cached in the placement) are parked: counted free by the pool."""
    return sum(self._pages[(first, layout.width, p)].refs == 0 for p in pages)

  def acquire(self, first: int, layout: PageLayout, pages: list[int]):
    """A table takes `pages` (a `match`): one more reference each; parked ones are used again."""
    for p in pages:
      e = self._pages[(first, layout.width, p)]
      if e.refs == 0:
        del self._lru[id(e)]
        self.pool.unpark(first, layout.width, [p])
      e.refs += 1

  # pages in and out ----------------------------------------------------------------------------
  def register(self, first: int, layout: PageLayout, name: int, parent: int, tokens: tuple,
               page: int) -> bool:
    """Name a full page a table holds (its one reference); False when the placement already has
    that name (another sequence computed the same tokens: this page stays private) or the page
    is already named."""
    place = (first, layout)
    if name in self._names[place] or (first, layout.width, page) in self._pages:
      return False
    e = _Entry(place, name, parent, tokens, page, 1)
    self._names[place][name] = e
    self._pages[(first, layout.width, page)] = e
    return True

  def release(self, first: int, width: int, pages: list[int], discard: bool = False) -> list[int]:
    """A table gives back `pages`: named ones lose a reference (parked at none, the table's
    tail first in the eviction order; `discard`: forgotten instead, their bytes untrusted);
    returns the pages for the pool to free."""
    free = []
    for p in reversed(pages):
      e = self._pages.get((first, width, p))
      if e is None:
        free.append(p)
        continue
      e.refs -= 1
      if e.refs == 0 and discard:
        self._forget(e)
        free.append(p)
      elif e.refs == 0:
        self.pool.park(first, width, [p])
        self._lru[id(e)] = e
    free.reverse()
    return free

  def _forget(self, e: _Entry):
    f, layout = e.place
    del self._names[e.place][e.name]
    del self._pages[(f, layout.width, e.page)]

  def reclaim(self, first: int, width: int, n: int):
    """Evict parked pages, least recently used first, until `n` pages are free on every device
    [first, first + width) or no parked page there is left."""
    end = first + width
    for key, e in list(self._lru.items()):
      if self.pool.free_now(first, width) >= n:
        return
      f, layout = e.place
      if f >= end or f + layout.width <= first:         # holds none of those devices
        continue
      del self._lru[key]
      self._forget(e)
      self.pool.drop(f, layout.width, [e.page])
      self.evicted += 1

  # figures -------------------------------------------------------------------------------------
  def counted(self, queried: int, hit: int):
    self.queried_tokens += queried
    self.hit_tokens += hit

  @property
  def hit_rate(self) -> float:
    return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

  def cached_pages(self) -> int:
    """Named pages, held or parked."""
    return len(self._pages)

  def parked_pages(self) -> int:
    return len(self._lru)
