"""A sequence being generated: its tokens, its pages and where it stands.

The KV of tokens `[0, computed)` is in the sequence's pages (under a model whose every layer
slides, the part a later query can still see: the pages before its window are given back). A
hybrid model's sliding-window layers keep theirs in a second page table, `local`, that holds only
the window (`kv.window`). When
exactly one token is not computed the sequence decodes (one token per step); otherwise it prefills
a chunk of what is missing, which also covers a preempted sequence that recomputes its prompt and
the tokens it already generated.
"""

from __future__ import annotations

import dataclasses
import enum
import time

from flying_jax.kv import PageLayout
from flying_jax.sampling import SamplingParams


class Status(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"
  PAUSED = "paused"          # pages kept while its group is absent from the partition
  FINISHED = "finished"


@dataclasses.dataclass
class PageTable:
  """A sequence's page table in one page space: entry i holds tokens [i*T, (i+1)*T) of its
  layout; entries [0, dropped) were given back (wholly before the sliding window) and hold the
  null page; `spare` pages are held but not in the table yet (a windowed prefill keeps the pages
  it drops for the chunks ahead, so that it never waits for the pool)."""
  pages: list[int] = dataclasses.field(default_factory=list)
  dropped: int = 0
  spare: list[int] = dataclasses.field(default_factory=list)
  named: int = 0            # leading entries named in the prefix cache (`kv.prefix`)
  chain: int = 0            # the name of the last of them (0: none yet)

  def held(self) -> list[int]:
    """The pool pages held: the table's live entries and the spare pages."""
    return self.pages[self.dropped:] + self.spare

  def take(self) -> list[int]:
    """Forget every page (the caller gives them back to the pool); returns them."""
    held = self.held()
    self.pages, self.spare, self.dropped, self.named, self.chain = [], [], 0, 0, 0
    return held


@dataclasses.dataclass
class TokenLogprob:
  token_id: int
  logprob: float
  top: list[tuple[int, float]]


@dataclasses.dataclass(eq=False)
class Sequence:
  seq_id: int
  request_id: str
  index: int                                  # which of the request's n samples
  prompt_ids: list[int]
  params: SamplingParams
  seed: int
  stop_ids: frozenset[int]
  priority: int = 0
  output_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
  status: Status = Status.WAITING
  group: int | None = None                    # group index within the current partition
  first_device: int = 0
  layout: PageLayout | None = None
  kv: PageTable = dataclasses.field(default_factory=PageTable)
  # ^ the page table every layer reads (a hybrid model's global layers)
  local: PageTable = dataclasses.field(default_factory=PageTable)
  # ^ a hybrid model's sliding-window layers: pages of their own pools, the window only
  computed: int = 0
  cached_tokens: int = 0                      # prompt tokens whose KV the prefix cache gave
  pending: int = 0                            # sampled tokens still on the device (0 or 1)
  feed_row: int = 0                           # the sampled row (in its group) of the pending one
  admitted_at: int = -1                       # admission order, for preemption choice
  preemptions: int = 0
  recomputes: int = 0                         # times a switch made it prefill again
  finish_reason: str | None = None
  stop_reason: int | str | None = None
  error: str | None = None
  arrival_time: float = dataclasses.field(default_factory=time.monotonic)
  scheduled_time: float | None = None
  paused_at: float = 0.0                      # when a switch last paused it
  first_token_time: float | None = None
  finish_time: float | None = None
  text: str = ""                              # detokenized output (stop strings already cut)
  sampling_row: tuple | None = None           # its packed sampling fields (`runtime.executor`)
  matcher: object = None                      # structured output: its position in the
  #                                             constraint (`engine.outputs`), host state only
  page_names: tuple[int, list[int]] = (0, [])  # (tokens per page, the prefix cache's names of
  # ^ its full pages so far), computed once per layout's page size (`kv.prefix.page_names`)
  prompt_len: int = dataclasses.field(init=False)

  def __post_init__(self):
    self.prompt_len = len(self.prompt_ids)

  @property
  def length(self) -> int:
    """Prompt, generated tokens and a token sampled by a step whose result the host has not read
    yet (`pending`; the next step reads it on the device, `runtime.executor`)."""
    return self.prompt_len + len(self.output_ids) + self.pending

  @property
  def generated(self) -> int:
    """Tokens sampled so far, the pending one included (the sampler's step counter)."""
    return len(self.output_ids) + self.pending

  def token_at(self, i: int) -> int:
    p = len(self.prompt_ids)
    return self.prompt_ids[i] if i < p else self.output_ids[i - p]

  def tokens(self, start: int, stop: int) -> list[int]:
    """Token ids at positions [start, stop) of prompt + generated tokens."""
    p = len(self.prompt_ids)
    if stop <= p:
      return self.prompt_ids[start:stop]
    return (self.prompt_ids[start:] if start < p else []) + self.output_ids[max(start - p, 0):stop - p]

  @property
  def remaining(self) -> int:
    """Tokens whose KV is not computed yet (1 while decoding)."""
    return self.length - self.computed

  @property
  def is_decoding(self) -> bool:
    return self.length - self.computed == 1

  def ends_by_length(self, capacity: int) -> bool:
    """Whether its pending token ends it by a length limit (it must not be stepped again)."""
    return self.pending > 0 and (self.generated >= self.params.max_tokens
                                 or self.length >= capacity)

  @property
  def finished(self) -> bool:
    return self.status is Status.FINISHED

  @property
  def pages(self) -> list[int]:
    """The page table every layer reads (`kv.pages`)."""
    return self.kv.pages

  @property
  def dropped(self) -> int:
    return self.kv.dropped

  @property
  def spare(self) -> list[int]:
    return self.kv.spare

  def held_pages(self) -> list[int]:
    """The pool pages this sequence holds in `kv` (its table's live entries and spare pages)."""
    return self.kv.held()

  def max_length(self) -> int:
    return self.prompt_len + self.params.max_tokens
