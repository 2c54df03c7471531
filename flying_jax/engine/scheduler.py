"""Continuous batching: which sequences run in each group this step.

Pure host logic, no JAX. Every step each group runs its decoding sequences (one token each, up to
the largest decode bucket) plus prefill chunks, within a per-step token budget: one long chunk of
one sequence, or, when several sequences wait for prefill, shorter chunks of several side by side
(the (rows, tokens per row) modes come from the compiled step shapes).
Waiting sequences are admitted in arrival order (no overtaking, so none starves) to the group with
the most free pages, with pages for their whole prompt reserved up front. In a mixed partition the
groups wider than the narrowest are kept for latency-critical requests (priority > 0) and for
requests no narrow group can hold; those may pass ordinary requests that wait for a narrow group,
never each other. Within a group, latency-critical prompts take the step's prefill budget
first. A decoding sequence that
needs a page when none is free preempts the most recently admitted sequence of its group, which
frees its pages and later recomputes (prompt + generated tokens) from the front of the queue.

Under a model whose every layer slides (`window`), a page wholly before a sequence's window is
never read again: at the start of each step it leaves the sequence's page table (the entry points
at the null page). A decoding sequence gives it back to the pool at once, so it holds at most
`(window - 1) // tokens_per_page + 2` pages; a prefilling one keeps it as a spare page for its
chunks ahead. A sequence is admitted (or migrated) with the pages the rest of its run reads at
once (`pages_needed`), not with pages for its whole length.

A hybrid model (some layers slide, some do not: Gemma 3) has two page spaces (`engine.pages`):
its global layers' pages, held for a sequence's whole length as above, and its sliding layers'
own smaller pools, held for the window only. Admission and migration need room in both, a decoding
sequence that lacks a page in either preempts, and every release gives back both.

With a prefix cache (`kv.prefix`, models without sliding layers) a waiting sequence is admitted
with the cached pages its tokens start with in the group it goes to and prefills from the first
token they lack; among the least busy groups that may take it, the one with most of its
prefix cached goes first (each replica computes a shared system prompt once, then finds it).
The pages of the running sequences are named in the cache as they fill, at the start of each
step.
"""

from __future__ import annotations

import collections
import dataclasses

from flying_jax.engine.pages import PageSpace
from flying_jax.engine.sequence import Sequence, Status
from flying_jax.kv import PageLayout, PagePool, PoolExhausted
from flying_jax.kv.prefix import PrefixCache


AFFINITY = 0     # a group with cached pages for a request may run this many sequences more than
#                  the least busy one and still take it first (`Scheduler._place`). 0: the groups
#                  of a span run one program shape, so prefills piled on the group that holds a
#                  shared prompt wait in turn while the others idle (measured: `flying-jax bench
#                  prefix`, P90 TTFT 1.4x worse than no cache at 2; each group computing the
#                  prompt once is cheaper)


@dataclasses.dataclass(frozen=True)
class Group:
  first_device: int
  width: int
  layout: PageLayout
  capacity: int                # the longest sequence it holds


@dataclasses.dataclass(frozen=True)
class PrefillRow:
  seq: Sequence
  start: int
  length: int
  samples: bool = dataclasses.field(init=False)
  # ^ whether the chunk reaches the end of the sequence (its last token's logits are sampled), as
  #   scheduled: a step in flight leaves the token it samples pending in the sequence's length

  def __post_init__(self):
    object.__setattr__(self, "samples", self.start + self.length == self.seq.length)


@dataclasses.dataclass
class GroupWork:
  decode: list[Sequence]
  prefills: list[PrefillRow] = dataclasses.field(default_factory=list)

  @property
  def empty(self) -> bool:
    return not self.decode and not self.prefills

  @property
  def prefill_tokens(self) -> int:
    return sum(p.length for p in self.prefills)


@dataclasses.dataclass(frozen=True)
class SchedulerLimits:
  max_decode: int                          # decode slots per group (largest decode bucket)
  prefill_modes: tuple[tuple[int, int], ...]   # (rows, tokens per row) the programs allow
  token_budget: int                        # decode tokens + prefill tokens per group per step

  def mode_for(self, waiting_rows: int) -> tuple[int, int]:
    """The most rows not above `waiting_rows` (at least one), then the longest chunk."""
    fit = [m for m in self.prefill_modes if m[0] <= max(1, waiting_rows)] or [min(self.prefill_modes)]
    return max(fit)


class Scheduler:
  """Owns the waiting queue and the running sequences of each group of one partition."""

  def __init__(self, pool: PagePool, groups: list[Group], limits: SchedulerLimits,
               window: int = 0, local: PagePool | None = None, local_window: int = 0,
               cache: PrefixCache | None = None):
    """`window`: the sliding window of a model whose every layer slides, whose passed pages are
    freed while sequences run (0: keep every page). `local`: the pool of a hybrid model's
    sliding-window layers, whose tables keep `local_window` tokens. `cache`: the prefix cache of
    `pool` (it outlives a partition's scheduler; None: off)."""
    self.pool, self.groups, self.limits = pool, groups, limits
    self.window = window
    self.cache = cache
    longest = max((c for _, c in limits.prefill_modes), default=1)
    self.spaces = [PageSpace(pool, window, longest, cache=cache)]
    if local is not None:
      self.spaces.append(PageSpace(local, local_window, longest, "local"))
    self._windowed = [sp for sp in self.spaces if sp.window]
    self.capacity = max(g.capacity for g in groups)   # longer sequences wait for another partition
    self._narrow = min(g.width for g in groups)
    self._narrow_capacity = max(g.capacity for g in groups if g.width == self._narrow)
    self._uniform = len({g.width for g in groups}) == 1
    self.closed: set[int] = set()     # groups not admitting (draining for a switch)
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.running: list[list[Sequence]] = [[] for _ in groups]
    self._admissions = 0
    self.preempted_total = 0

  # queue ---------------------------------------------------------------------------------------
  def add(self, seq: Sequence):
    self.waiting.append(seq)

  def has_work(self) -> bool:
    return bool(self.waiting) or any(self.running)

  def num_running(self) -> int:
    return sum(len(r) for r in self.running)

  def remove(self, seq: Sequence, discard: bool = False):
    """Take a sequence out wherever it is, freeing its pages (finish, abort or error; `discard`:
    a failed step wrote them, the prefix cache forgets those only it holds)."""
    if seq.status is Status.WAITING:
      try:
        self.waiting.remove(seq)
      except ValueError:
        pass
    elif seq.group is not None and seq in self.running[seq.group]:
      self.running[seq.group].remove(seq)
    self.release_pages(seq, discard)

  def continue_admissions(self, previous: "Scheduler"):
    """Keep admission order (and preemption choice) consistent across a partition switch."""
    self._admissions = max(self._admissions, previous._admissions)
    self.preempted_total += previous.preempted_total

  def release_pages(self, seq: Sequence, discard: bool = False):
    """Give back every page `seq` holds, in every page space."""
    for space in self.spaces:
      space.release(seq, discard)
    seq.group = None

  # pages of the main space (the one every layer of a non-hybrid model reads) -----------------
  def first_live(self, computed: int, layout: PageLayout) -> int:
    return self.spaces[0].first_live(computed, layout)

  def peak_pages(self, layout: PageLayout) -> int:
    return self.spaces[0].peak_pages(layout)

  def pages_needed(self, seq: Sequence, layout: PageLayout, computed: int | None = None) -> int:
    return self.spaces[0].pages_needed(seq, layout, computed)

  # one step ------------------------------------------------------------------------------------
  def schedule(self, groups: range | None = None) -> list[GroupWork]:
    """The next step of `groups` (one span's, default every group), one GroupWork each; waiting
    sequences are admitted to any group first."""
    groups = range(len(self.groups)) if groups is None else groups
    for space in self._windowed:
      for g in groups:
        for seq in self.running[g]:
          space.free_passed(seq)
    if self.cache is not None:
      for g in groups:
        for seq in self.running[g]:
          self.spaces[0].name_full(seq)
    self._admit()
    work, waiting = [], []
    for g in groups:
      decode, prefill = self._split(g)
      work.append(GroupWork(decode=decode))
      waiting.append(prefill)
    rows, chunk = self.limits.mode_for(max(len(w) for w in waiting))
    for w, cands in zip(work, waiting):
      budget = self.limits.token_budget - len(w.decode)
      for seq in cands[:rows]:
        n = min(seq.remaining, chunk, budget)
        if n <= 0:
          break
        n = self._pages_for_chunk(seq, n)
        if n <= 0:
          continue
        w.prefills.append(PrefillRow(seq, seq.computed, n))
        budget -= n
    return work

  def _pages_for_chunk(self, seq: Sequence, n: int) -> int:
    """Table entries for a chunk of `n` tokens from `seq.computed` in every space (under a
    window they come from its spare pages); returns the tokens all its tables cover, at most n."""
    for space in self.spaces:
      try:
        space.map(seq, seq.computed + n)
      except PoolExhausted:              # not under admission's accounting: a shorter chunk
        pass
      n = min(n, space.covered(seq) - seq.computed)
    return n

  def _wide_class(self, seq: Sequence) -> bool:
    """Whether `seq` belongs to the wide groups of a mixed partition."""
    return seq.priority > 0 or seq.max_length() > self._narrow_capacity

  def _admit(self):
    blocked: set[bool] = set()          # classes whose head could not be placed: FIFO within one
    admitted = []
    for seq in self.waiting:
      cls = self._wide_class(seq)
      if cls in blocked:
        continue
      g, hits = self._place(seq, cached=True)
      if g is None:
        blocked.add(cls)
        if len(blocked) == 2 or self._uniform:
          break
        continue
      grp = self.groups[g]
      seq.group, seq.first_device, seq.layout = g, grp.first_device, grp.layout
      self.spaces[0].admit(seq, hits)
      for space in self.spaces[1:]:
        space.admit(seq)
      seq.status, seq.computed = Status.RUNNING, len(hits) * grp.layout.tokens_per_page
      if self.cache is not None and seq.admitted_at < 0:     # its first admission
        seq.cached_tokens = seq.computed
        self.cache.counted(seq.prompt_len, seq.computed)
      seq.admitted_at = self._admissions
      self._admissions += 1
      self.running[g].append(seq)
      admitted.append(seq)
    if admitted:
      done = set(map(id, admitted))
      kept = [s for s in self.waiting if id(s) not in done]
      self.waiting.clear()
      self.waiting.extend(kept)

  def pick_group(self, seq: Sequence) -> int | None:
    """The group that takes `seq` now (a migration: its KV moves whole), or None."""
    return self._place(seq)[0]

  def _place(self, seq: Sequence, cached: bool = False) -> tuple[int | None, list[int]]:
    """The group that takes `seq` now, or None, and (`cached`) the prefix cache's pages its
    tokens start with there.

    Ordinary requests go to the narrowest groups, latency-critical and long ones to the widest
    that hold them; among equals, the group with most cached pages for it unless it runs
    more sequences than the least busy one (`AFFINITY`: the cache saves prefill, not at the
    cost of idle replicas), then the group with most free pages, cached ones counted free.
    """
    wide = self._wide_class(seq)
    fit = []
    for g, grp in enumerate(self.groups):
      if g in self.closed or seq.max_length() > grp.capacity:
        continue
      if not wide and grp.width != self._narrow:
        continue
      if len(self.running[g]) >= self.limits.max_decode:
        continue
      hits = self.spaces[0].cached(seq, grp.first_device, grp.layout) if cached else []
      if not (self.spaces[0].fits(seq, grp.first_device, grp.layout, hits)
              and all(sp.fits(seq, grp.first_device, grp.layout) for sp in self.spaces[1:])):
        continue
      fit.append((g, hits))
    if not fit:
      return None, []
    calm = min(len(self.running[g]) for g, _ in fit) + AFFINITY

    def key(gh):
      g, hits = gh
      grp = self.groups[g]
      near = len(hits) if len(self.running[g]) <= calm else 0
      return (grp.width if wide else 0, near,
              self.pool.free_count(grp.first_device, grp.width) + len(hits))
    return max(fit, key=key)

  def _split(self, g: int) -> tuple[list[Sequence], list[Sequence]]:
    """Group g's decoding sequences (up to the decode slots, each with a page for the token it
    writes) and its sequences still prefilling; not those that the token a step in flight
    samples ends by length."""
    slots, capacity = self.limits.max_decode, self.groups[g].capacity
    decode, prefill = [], []
    for s in self.running[g]:
      if s.ends_by_length(capacity):       # its token still on the device is its last
        continue
      if s.is_decoding:
        if len(decode) < slots:
          decode.append(s)
      else:
        prefill.append(s)
    preempted = False
    for s in decode:
      if any(space.needs_page(s) for space in self.spaces):
        preempted |= self._ensure_page(s, g)
    if preempted:
      decode = [s for s in decode if s.status is Status.RUNNING and s.group == g]
      prefill = [s for s in prefill if s.status is Status.RUNNING and s.group == g]
    if any(s.priority for s in prefill):    # latency-critical prompts take the chunk budget first
      prefill.sort(key=lambda s: -s.priority)
    return decode, prefill

  def _ensure_page(self, seq: Sequence, g: int) -> bool:
    """Make room for the token this step writes, in every space; preempt younger sequences if
    needed (returns whether it did)."""
    preempted = False
    while seq.status is Status.RUNNING:
      lacking = [space for space in self.spaces if space.needs_page(seq)]
      if not lacking:
        break
      try:
        for space in lacking:
          space.map(seq, seq.computed + 1)
      except PoolExhausted:
        self._preempt(max(self.running[g], key=lambda s: s.admitted_at))
        preempted = True
    return preempted

  def _preempt(self, seq: Sequence):
    self.running[seq.group].remove(seq)
    self.release_pages(seq)
    seq.status, seq.computed = Status.WAITING, 0
    seq.preemptions += 1
    self.preempted_total += 1
    self.waiting.appendleft(seq)
