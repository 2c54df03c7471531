"""Page counts under a sliding window: what a sequence's table still needs, and how big the
sliding layers' own pools of a hybrid model are.

A query at position p of a window-W layer reads keys p-W+1 .. p. A page table indexed by position
(entry i holds tokens [i*T, (i+1)*T)) therefore only needs the entries from the one holding the
first key the next query reads; the entries before it point at the null page and their pages go
back to the pool. One step writes a chunk of up to C tokens and then reads, for its first query,
the W - 1 keys before it: at most `peak_pages` entries are live at once (`decode_pages` when the
step decodes one token).

A hybrid model (some layers slide, some do not: Gemma 3) keeps its sliding layers' KV in pools of
their own (`local_pages` per device instead of `pages`), read through a second page table that
holds only the window. Those pools need not be as large as the global layers' pools: a sequence
holds at most `peak_pages` there whatever its length. A sequence shorter than its window holds as
many pages there as in the global pools, so a smaller sliding pool bets on long sequences; by
default it is sized so that it never binds while every sequence is at least `LOCAL_POOL_WINDOWS`
windows long (`default_local_pages`), and never below one sequence's peak.
"""

from __future__ import annotations

LOCAL_POOL_WINDOWS = 2        # sequences this many windows long never wait for sliding pages


def first_live(computed: int, window: int, tokens_per_page: int) -> int:
  """The first table entry a query at position `computed` or later still reads."""
  return max(0, computed - window + 1) // tokens_per_page


def decode_pages(window: int, tokens_per_page: int) -> int:
  """The most entries one decode step reads: the window, and one page cut on each side."""
  return (window - 1) // tokens_per_page + 2


def peak_pages(window: int, longest_row: int, tokens_per_page: int) -> int:
  """The most entries one step reads: its longest prefill row and the window before it."""
  return (window + longest_row - 2) // tokens_per_page + 2


def default_local_pages(pages: int, window: int, page_tokens: int, longest_row: int) -> int:
  """Pages per device of a hybrid model's sliding-layer pools next to `pages` per device of its
  global ones (page 0 of both is the null page).

  The global pools hold at most `(pages - 1) // (LOCAL_POOL_WINDOWS * window pages)` sequences
  of `LOCAL_POOL_WINDOWS` windows each on a device; the sliding pools hold their decode windows
  and one prefill's peak, at least one sequence's peak, never more than the global pools (a
  sequence never holds more pages there than in the global ones). Counted at `page_tokens`, the
  fewest tokens per page of any width (the most pages)."""
  per_window = -(-window // page_tokens)
  decode = decode_pages(window, page_tokens)
  peak = peak_pages(window, longest_row, page_tokens)
  long_sequences = (pages - 1) // (LOCAL_POOL_WINDOWS * per_window)
  need = max(peak, long_sequences * decode + peak - decode)
  return 1 + min(pages - 1, need)


def min_local_pages(window: int, page_tokens: int, longest_row: int) -> int:
  """The smallest sliding-layer pool that serves any sequence: one peak and the null page."""
  return 1 + peak_pages(window, longest_row, page_tokens)
