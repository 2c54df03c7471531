"""Changing the partition at a step boundary, and what happens to the requests in flight.

Strategies for sequences running in groups of the old partition that the new one does not have
(a group kept by both partitions, same devices and width, keeps its sequences as they are):
  drain      stop admitting to those groups; let their sequences finish; then switch (waiting
             ones carry over);
  pause      keep their pages and layout untouched; they resume when a group with their exact
             devices and width exists again;
  recompute  free their pages; they prefill prompt + generated tokens again in the new layout.
             Sequences paused by an earlier switch whose group does not return now are recomputed
             too (a recompute switch gives up waiting for their layout);
  migrate    re-lay their KV into pages of a new group with a compiled program and go on
             decoding (a sequence that finds no room in the new partition is recomputed); a
             hybrid model's sliding layers move only their window, into their own pools.
Weights never move: every width's programs read the same resident arrays.
"""

from __future__ import annotations

import dataclasses
import enum
import time

from flying_jax.engine.scheduler import Scheduler
from flying_jax.kv import NULL_PAGE
from flying_jax.kv.migrate import Placement
from flying_jax.parallel import Partition
from flying_jax.engine.sequence import Sequence, Status


class Strategy(str, enum.Enum):
  DRAIN = "drain"
  PAUSE = "pause"
  RECOMPUTE = "recompute"
  MIGRATE = "migrate"


@dataclasses.dataclass
class SwitchRecord:
  """One switch, for logs and metrics."""
  from_width: int | str          # a width (uniform partition) or a mixed partition's name
  target: Partition               # the partition switched to
  strategy: str
  reason: str
  requested_at: float
  cutover_s: float = 0.0          # host bookkeeping of the cutover itself
  paused: int = 0
  recomputed: int = 0
  resumed: int = 0
  migrated: int = 0
  migrated_elements: int = 0      # KV elements moved per layer, K and V each (a hybrid model:
  # ^ per global layer; its sliding layers' in `migrated_window_elements`)
  migrated_window_elements: int = 0
  abandoned: int = 0              # paused earlier, recomputed now (their group did not return)
  carried_waiting: int = 0
  kept: int = 0                   # in a group both partitions have: untouched

  @property
  def to_width(self) -> int | str:
    return label(self.target)


def label(part: Partition) -> int | str:
  """A uniform partition by its width, a mixed one by its name (logs and switch records)."""
  return part.uniform_width if part.uniform_width is not None else part.name


class PausedSequences:
  """Sequences whose pages wait, untouched, for their group (first device, width) to return."""

  def __init__(self, clock=time.monotonic):
    self.clock = clock
    self._by_group: dict[tuple[int, int], list[Sequence]] = {}

  def add(self, seq: Sequence):
    seq.status = Status.PAUSED
    seq.paused_at = self.clock()
    self._by_group.setdefault((seq.first_device, seq.layout.width), []).append(seq)

  def take(self, first_device: int, width: int) -> list[Sequence]:
    return self._by_group.pop((first_device, width), [])

  def remove(self, seq: Sequence) -> bool:
    group = self._by_group.get((seq.first_device, seq.layout.width), [])
    if seq in group:
      group.remove(seq)
      return True
    return False

  def oldest_age(self) -> float:
    """How long the longest-paused sequence has waited (0 when none)."""
    now = self.clock()
    return max((now - s.paused_at for g in self._by_group.values() for s in g), default=0.0)

  def all(self) -> list[Sequence]:
    return [s for group in self._by_group.values() for s in group]

  def __len__(self):
    return sum(len(g) for g in self._by_group.values())


def check_switch(part: Partition, strategy, scheduler: Scheduler, setups: dict,
                 can_migrate: bool) -> tuple[Partition, Strategy]:
  """`(part, Strategy(strategy))` if a switch to `part` can happen now, else ValueError (a bad
  strategy) or RuntimeError (a request in flight longer than the target's widest group holds)."""
  try:
    strategy = Strategy(strategy)
  except ValueError:
    raise ValueError(f"unknown switch strategy {strategy!r}; use one of "
                     f"{', '.join(s.value for s in Strategy)}") from None
  if strategy is Strategy.MIGRATE and not can_migrate:
    raise ValueError("the migrate strategy needs more than one compiled width")
  kept = set(part.groups)
  cap = max(setups[w].capacity for w in part.widths)
  moved = [s for g, grp in enumerate(scheduler.groups) if (grp.first_device, grp.width)
           not in kept for s in scheduler.running[g]]
  movable = list(scheduler.waiting) + ([] if strategy is Strategy.PAUSE else moved)
  too_long = [s.request_id for s in movable if s.max_length() > cap]
  if too_long:
    raise RuntimeError(f"cannot switch to {part.name}: requests {sorted(set(too_long))[:5]} "
                       f"are longer than its widest group holds ({cap} tokens)")
  return part, strategy


def cut_over(old: Scheduler, new: Scheduler, strategy: Strategy, paused: PausedSequences,
             record: SwitchRecord, migrate=None):
  """Move every sequence of `old` into `new` (or into `paused`) according to `strategy`.

  `migrate(seq) -> elements moved per layer of each page space, or None` re-lays one sequence
  into `new` (migrate strategy, `migrate_sequence`).
  """
  t0 = time.perf_counter()
  same = {(grp.first_device, grp.width): g for g, grp in enumerate(new.groups)}
  running = sorted((s for group in old.running for s in group), key=lambda s: s.admitted_at)
  requeue = []
  for seq in running:
    g = same.get((seq.first_device, seq.layout.width))
    if g is not None:
      seq.group = g
      new.running[g].append(seq)
      record.kept += 1
      continue
    moved = migrate(seq) if strategy is Strategy.MIGRATE else None
    if moved is not None:
      record.migrated += 1
      record.migrated_elements += moved[0]
      record.migrated_window_elements += sum(moved[1:])
    elif strategy is Strategy.PAUSE:
      seq.group = None
      paused.add(seq)
      record.paused += 1
    else:
      _requeue(old, seq)
      requeue.append(seq)
      record.recomputed += 1
  record.carried_waiting = len(old.waiting)
  new.waiting.extend(requeue)
  new.waiting.extend(old.waiting)           # the old scheduler is dropped after the cutover
  new.continue_admissions(old)
  for g, grp in enumerate(new.groups):
    for seq in paused.take(grp.first_device, grp.width):
      seq.group, seq.status = g, Status.RUNNING
      new.running[g].append(seq)
      record.resumed += 1
  if strategy is Strategy.RECOMPUTE:
    stale = sorted(paused.all(), key=lambda s: s.admitted_at)
    for seq in stale:
      paused.remove(seq)
      _requeue(old, seq)
      record.abandoned += 1
    new.waiting.extendleft(reversed(stale))
  record.cutover_s = time.perf_counter() - t0


def requeue_paused(scheduler: Scheduler, paused: PausedSequences,
                   older_than: float = 0.0) -> list[Sequence]:
  """Give up on paused sequences that waited at least `older_than` seconds: free their pages and
  put them at the front of `scheduler`'s queue (oldest admission first) to prefill again."""
  now = paused.clock()
  stale = sorted((s for s in paused.all() if now - s.paused_at >= older_than),
                 key=lambda s: s.admitted_at)
  for seq in stale:
    paused.remove(seq)
    _requeue(scheduler, seq)
  scheduler.waiting.extendleft(reversed(stale))
  return stale


def _requeue(scheduler: Scheduler, seq: Sequence):
  scheduler.release_pages(seq)
  seq.status, seq.computed = Status.WAITING, 0
  seq.recomputes += 1


def migrate_sequence(seq: Sequence, new: Scheduler, move) -> tuple[int, ...] | None:
  """Re-lay `seq`'s KV into a group of `new`; returns the elements moved per layer of each page
  space (None: no room in one of them).

  `move(space, src, dst, start, stop) -> elements` moves the KV of tokens [start, stop) of the
  layers reading page space `space` (its index in `new.spaces`; `MigrationPrograms.move`). Under a
  window (every layer of an all-sliding model, a hybrid model's sliding layers) only the tokens a
  later query still sees move, into pages for the part of the table from the first one still
  read (the entries before it point at the null page)."""
  g = new.pick_group(seq)
  if g is None:
    return None
  grp = new.groups[g]
  moved = tuple(_migrate_space(seq, space, grp, lambda *a, i=i: move(i, *a))
                for i, space in enumerate(new.spaces))
  seq.first_device, seq.layout, seq.group = grp.first_device, grp.layout, g
  new.running[g].append(seq)
  return moved


def _migrate_space(seq: Sequence, space, grp, move) -> int:
  """Move `seq`'s table in `space` (a `PageSpace`) to pages of group `grp`; returns `move`'s."""
  table = space.table(seq)
  first = space.first_live(seq.computed, grp.layout)
  pages = [NULL_PAGE] * first + space.pool.allocate(grp.first_device, grp.width,
                                                    space.pages_needed(seq, grp.layout))
  src = Placement(seq.first_device, seq.layout, tuple(table.pages))
  dst = Placement(grp.first_device, grp.layout, tuple(pages))
  start = max(first * grp.layout.tokens_per_page, table.dropped * seq.layout.tokens_per_page)
  moved = move(src, dst, min(start, seq.computed), seq.computed)
  space.give_back(seq.first_device, seq.layout.width, table.take())
  table.pages, table.dropped = pages, first
  return moved
