"""The engine: requests in, one step at a time, tokens and text out.

`Engine.step()` launches the next step of every span of the partition that has room for one (the
scheduler plans each span's groups, the executor dispatches its compiled programs) and collects
the steps that are done (`engine.stepping`): appends the sampled tokens, applies stop ids, stop
strings and length limits, and frees the pages of every sequence that finished. Spans step
independently. It is single-threaded by design: one controller owns the dispatch order (a server
runs it on its own thread).
"""

from __future__ import annotations

import collections
import itertools
import logging
import random
import time
from typing import Callable

import jax

from flying_jax.config import MeshPreset, ModelCard
from flying_jax.engine import introspect
from flying_jax.engine import setup as S
from flying_jax.engine import stepping
from flying_jax.engine.admission import RequestRejected, validate
from flying_jax.engine.demand import Demand
from flying_jax.engine.outputs import OutputProcessor
from flying_jax.engine.policies import Observation, Policy, StaticPolicy, make_policy
from flying_jax.engine.scheduler import Group, Scheduler, SchedulerLimits
from flying_jax.engine.sequence import Sequence, Status
from flying_jax.engine.stepping import SeqEvent, StepTiming
from flying_jax.kv.prefix import PrefixCache
from flying_jax.engine.switching import (PausedSequences, Strategy, SwitchRecord, check_switch,
                                        cut_over, label, migrate_sequence, requeue_paused)
from flying_jax.parallel import Partition, PartitionError
from flying_jax.sampling import SamplingParams

log = logging.getLogger("flying_jax")


class Engine:
  def __init__(self, card: ModelCard, preset: MeshPreset, config: S.EngineConfig = S.EngineConfig(),
               tokenizer=None, devices=None, host_weights: dict | None = None, policy=None,
               clock: Callable[[], float] = time.monotonic, runtime=S.build_runtime):
    """`clock` gives the times requests see (arrival, first token, finish, pauses); `runtime`
    builds what start-up leaves resident (`setup.build_runtime`; the simulator passes its own,
    whose executor advances `clock` by a cost model instead of running programs)."""
    self.card, self.preset, self.config = card, preset, config
    self.tokenizer, self.clock = tokenizer, clock
    devices = list(devices if devices is not None else jax.devices()[: preset.devices])
    if len(devices) < preset.devices:
      raise RuntimeError(f"mesh {preset.name} needs {preset.devices} devices, "
                         f"{len(devices)} available")
    self.devices = devices
    widths = tuple(config.widths or preset.widths)
    n = len(devices)
    # refused now if not allowed (by the preset, the widths, or the processes holding devices)
    mixed = S.mixed_partitions(preset, widths, config.partitions, devices)
    self.partitions: dict[str, Partition] = {
        **{Partition.uniform(n, w).name: Partition.uniform(n, w) for w in widths}, **mixed}
    self._parsed: dict = {}
    self._pending: SwitchRecord | None = None     # a drain waiting for its groups to empty
    self.superseded_drains = 0
    first = self.compiled_partition(config.width if config.width is not None else widths[0])
    self.set_policy(policy)                                   # refused now, not at run time
    self.report = S.StartupReport()
    # self.pages, local_pages, page_spaces, span_setups, setups, weights, device_pools, pool,
    # local_pool, registry, resident, executor, migrator: see setup.Runtime
    vars(self).update(vars(runtime(card, preset, config, devices, self.partitions, widths,
                                   host_weights, self.report)))
    self.outputs = OutputProcessor(tokenizer, clock)
    # shared full pages (`kv.prefix`), kept across partitions; models with sliding layers give
    # pages back as they pass the window, so they keep none
    self.prefix_cache = (PrefixCache(self.pool) if config.prefix_cache
                         and not card.arch.sliding_window else None)
    self.demand = Demand()                  # arrival rate and step times, measured live
    self._partition(first)
    self.resident.arrange(first.spans)
    self._ids = itertools.count()
    self._requests: dict[str, list[Sequence]] = {}
    self._seed_base = random.getrandbits(31)
    self.timings: collections.deque[StepTiming] = collections.deque(maxlen=4096)
    self.steps = 0                          # steps launched (a span's step each)
    self.collected = 0                      # steps collected
    self.step_s = 0.0                       # time per busy step() call on the engine's clock
    #                                         (moving average; policies weigh delays by it)
    self._facts = introspect.StaticFacts.of(self)
    self.paused = PausedSequences(clock)
    self.seconds_per_partition: collections.Counter[str] = collections.Counter()
    self.switches: list[SwitchRecord] = []
    self.pause_expired = 0                  # paused sequences given up on (recompute_paused)
    self.overlap = config.overlap and getattr(self.executor, "overlaps", False)
    self._ready: list[SeqEvent] = []        # events collected outside `step()`
    self.waited_s = 0.0

  def compiled_partition(self, target) -> Partition:
    """The compiled partition `target` names (a width, a name such as "4+1x4", a Partition).

    Remembered per target: a policy names its choice every step."""
    part = self._parsed.get(target)
    if part is not None:
      return part
    try:
      part = Partition.parse(target, len(self.devices))
    except PartitionError as e:
      raise ValueError(str(e)) from None
    if part.name not in self.partitions:
      raise ValueError(f"partition {part.name} is not compiled (compiled: "
                       f"{', '.join(self.partitions)}); widths come from the mesh preset's "
                       f"`widths`, mixed partitions from its `partitions`")
    self._parsed[target] = part
    return part

  def _partition(self, part: Partition):
    """Serve `part`: a scheduler over its groups, each with its span's layout and capacity."""
    self._spans = [self.span_setups[sp] for sp in part.spans]
    starts = list(itertools.accumulate((ws.specs.groups for ws in self._spans), initial=0))
    self._span_groups = [range(a, b) for a, b in zip(starts, starts[1:])]
    # per span, its steps launched and not collected, oldest first (`engine.stepping`); empty
    # whenever the partition changes (every switch collects first: `sync`)
    self._inflight = [collections.deque() for _ in self._spans]
    self.demand.new_partition()
    groups = [Group(first, w, S.layout_of(self.setups[w]), self.setups[w].capacity)
              for first, w in part.groups]
    ws = self._spans[0]
    modes = tuple(sorted({(s.pre_rows, s.chunk) for s in ws.shapes if s.chunk}))
    limits = SchedulerLimits(max(self.preset.decode_buckets), modes, self.preset.token_budget)
    self.partition = part
    self.width = part.uniform_width          # None in a mixed partition
    arch = self.card.arch
    window = arch.sliding_window if arch.all_sliding and self.config.free_window_pages else 0
    self.scheduler = Scheduler(self.pool, groups, limits, window, self.local_pool,
                               arch.sliding_window, self.prefix_cache)
    self.capacity = self.scheduler.capacity  # the longest sequence its widest group holds

  # switching -----------------------------------------------------------------------------------
  def switch(self, target, strategy: str = "recompute", reason: str = "manual") -> SwitchRecord:
    """Serve partition `target` (a width, or a mixed partition's name such as "4+1x4") from the
    next step on; sequences in groups the new partition does not keep follow `strategy`.

    With "drain" the switch happens at the first step boundary where those groups run nothing
    any more (they admit nothing until then); "pause", "recompute" and "migrate" cut over at once.
    Weights do not move; with "migrate" the KV of moved sequences is re-laid by a compiled
    program. Switching to the current partition with "recompute" gives up on paused sequences
    (they prefill again here). A switch supersedes a pending drain: the latest decision wins.
    Everything is checked before anything changes: a refused switch leaves the engine as it was.
    """
    part, strategy = self._checked_switch(target, strategy)
    return self._switch(part, strategy, reason)

  def _switch(self, part: Partition, strategy: Strategy, reason: str) -> SwitchRecord:
    """`switch` once `_checked_switch` has accepted it."""
    self._supersede_pending(reason)
    record = SwitchRecord(label(self.partition), part, strategy.value, reason, self.clock())
    if strategy is Strategy.DRAIN:
      self.scheduler.closed = {g for g, grp in enumerate(self.scheduler.groups)
                               if (grp.first_device, grp.width) not in set(part.groups)}
      self._pending = record
      self._maybe_finish_drain()
    else:
      self._cut_over(record, strategy)
    return record

  def _checked_switch(self, target, strategy) -> tuple[Partition, Strategy]:
    """The partition and strategy of a switch to `target`, or ValueError / RuntimeError saying
    why it cannot happen now; changes nothing."""
    part = self.compiled_partition(target)
    self.sync()                      # a switch reads what the sequences generated
    return check_switch(part, strategy, self.scheduler, self.setups, self.migrator is not None)

  def _supersede_pending(self, by: str):
    """Give up a pending drain (its groups admit again): a later decision replaces it."""
    if self._pending is None:
      return
    log.info("drain to %s superseded by %s", self._pending.to_width, by)
    self._pending = None
    self.scheduler.closed = set()
    self.superseded_drains += 1

  def pin(self, target, strategy: str = "drain", reason: str = "pin") -> Partition:
    """Pin partition `target` (the static policy) and switch there with `strategy`; a pending
    drain is superseded. All or nothing: a refused pin leaves the policy and partition as they
    were."""
    part, strategy = self._checked_switch(target, strategy)
    policy = StaticPolicy(label(part))
    if part != self.partition:
      self._switch(part, strategy, reason)
    else:
      self._supersede_pending(reason)
    self.policy = policy
    return part

  def set_policy(self, policy):
    """Choose the partition from the next step on by `policy` (see `make_policy`); a static
    policy on a partition that is not compiled is refused. A pending drain is superseded: the
    new policy decides afresh at the next step."""
    chosen = make_policy(policy)
    needed = getattr(chosen, "width", None)
    if needed is not None:
      try:
        self.compiled_partition(needed)
      except ValueError as e:
        raise ValueError(f"policy {policy}: {e}") from None
    self._supersede_pending(f"policy {chosen.name}")
    self.policy = chosen

  def observe(self) -> Observation:
    return introspect.observe(self, self._facts)

  def _apply_policy(self):
    if len(self.paused) and self.paused.oldest_age() >= self.config.max_pause_s:
      self.recompute_paused(self.config.max_pause_s)
    if self._pending is not None or type(self.policy) is Policy:
      return
    decision = self.policy.decide(self.observe())
    if decision is None:
      return
    try:
      target = self.compiled_partition(decision.partition)
      if target == self.partition and not (decision.strategy == "recompute" and len(self.paused)):
        return
      self.switch(target, decision.strategy, decision.reason)
    except (RuntimeError, ValueError) as e:      # e.g. an in-flight request too long for it
      log.info("policy %s: switch to %s refused: %s", self.policy.name, decision.partition, e)

  def _migrate_one(self, seq: Sequence) -> tuple[int, ...] | None:
    """Re-lay a running sequence's KV into a group of the new partition (None: no room): the
    layers of each page space with their pools' pages per device (`setup.Runtime.page_spaces`)."""
    slots = self.preset.page_tokens * self.card.arch.n_kv_heads

    def move(space, src, dst, start, stop):
      pages = self.page_spaces[space][1]
      return self.migrator.move(self.device_pools, self.card.arch, src, dst, stop, pages, slots,
                                start=start, space=space)
    return migrate_sequence(seq, self.scheduler, move)

  def recompute_paused(self, older_than: float = 0.0) -> int:
    """Give up on paused sequences that waited `older_than` seconds or more: they go to the front
    of the queue and prefill again in the partition in force. The engine does this itself past
    `max_pause_s`, whatever the policy or a pin. Returns how many."""
    stale = requeue_paused(self.scheduler, self.paused, older_than)
    self.pause_expired += len(stale)
    if stale:
      log.info("%d paused sequences waited %.1f s or more: recomputed in %s", len(stale),
               older_than, self.partition.name)
    return len(stale)

  @property
  def pending_switch(self) -> SwitchRecord | None:
    """The drain waiting for its groups to empty, if any."""
    return self._pending

  def _maybe_finish_drain(self):
    sch = self.scheduler
    if self._pending is not None and not any(sch.running[g] for g in sch.closed):
      record, self._pending = self._pending, None
      self._cut_over(record, Strategy.DRAIN)     # nothing runs there: waiting ones move, paused stay

  def _cut_over(self, record: SwitchRecord, strategy: Strategy):
    t0 = time.perf_counter()
    self.sync()
    old = self.scheduler
    if strategy is Strategy.MIGRATE:
      self.resident.merge()                      # the migration programs see the whole mesh
    self._partition(record.target)
    cut_over(old, self.scheduler, strategy, self.paused, record, self._migrate_one)
    self.resident.arrange(self.partition.spans)
    record.cutover_s = time.perf_counter() - t0
    self.switches.append(record)
    log.info("switch %s -> %s (%s, %s): %d kept, %d paused, %d recomputed, %d migrated, "
             "%d resumed, %d abandoned, %.2f ms", record.from_width, record.to_width,
             record.strategy, record.reason, record.kept, record.paused, record.recomputed,
             record.migrated, record.resumed, record.abandoned, 1e3 * record.cutover_s)

  def set_width(self, width):
    """Serve another compiled partition from the next step on; only while nothing is in flight."""
    part = self.compiled_partition(width)
    self.sync()
    if not self.no_leaks():
      raise RuntimeError(f"cannot switch to {part.name} while requests are running or waiting "
                         f"({self.scheduler.num_running()} running, "
                         f"{len(self.scheduler.waiting)} waiting)")
    self._partition(part)
    self.resident.arrange(part.spans)

  # requests ------------------------------------------------------------------------------------
  def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                  priority: int = 0, arrival_time: float | None = None) -> list[Sequence]:
    """Queue a request (n sequences); raises RequestRejected if it can never be served.

    `arrival_time` (on the engine's clock; default now) is when the request reached the server."""
    if request_id in self._requests:
      raise RequestRejected(f"request id {request_id!r} is already in use")
    validate(self, prompt_ids, params)
    stop = set(params.stop_token_ids)
    if not params.ignore_eos:
      stop |= set(self.card.tokenizer.stop_ids)
    base = params.seed if params.seed is not None else self._seed_base + next(self._ids) * 7919
    arrived = self.clock() if arrival_time is None else arrival_time
    seqs = [Sequence(next(self._ids), request_id, i, list(prompt_ids), params, base + i,
                     frozenset(stop), priority, arrival_time=arrived) for i in range(params.n)]
    self._requests[request_id] = seqs
    self.demand.arrived(arrived, len(prompt_ids) * params.n, urgent=priority > 0)
    for s in seqs:
      self.scheduler.add(s)
    return seqs

  def abort(self, request_id: str) -> bool:
    seqs = self._requests.pop(request_id, None)
    if seqs is None:
      return False
    for s in seqs:
      if s.status is Status.PAUSED and self.paused.remove(s):
        self.scheduler.release_pages(s)
      elif not s.finished:
        self.scheduler.remove(s)
      if not s.finished:
        self.outputs.finish(s, "abort")
    self._maybe_finish_drain()
    return True

  def release(self, request_id: str):
    """Forget a finished request (its sequences are already out of the scheduler)."""
    self._requests.pop(request_id, None)

  def has_unfinished(self) -> bool:
    """Whether a `step()` has anything left to do: requests, a step in flight, events to hand
    out."""
    return (self.scheduler.has_work() or len(self.paused) > 0 or any(self._inflight)
            or bool(self._ready))

  # one step ------------------------------------------------------------------------------------
  def step(self) -> list[SeqEvent]:
    """Launch the next step of every span with room for one, and collect what is done: returns
    the events of what was collected (when nothing was done yet, it waits for the first span to
    finish a step). With `overlap` a span's step n+1 is launched before its step n is collected,
    so the host schedules and packs while the device runs; it waits for the collect when the
    next step needs the previous one's tokens on the host (a sequence prefilling what it
    generated, penalties over its history). A switch collects every span first."""
    t0, started = time.perf_counter(), self.clock()
    self.waited_s = 0.0                       # blocked on sampled ids (`stepping.collect`)
    self._apply_policy()
    events, self._ready = self._ready, []
    launched, blocked = stepping.launch_spans(self, started)
    # with overlap, a step launched now stays in flight while the host takes in the ones before
    keep = {id(f) for f in launched} if self.overlap else set()
    events += stepping.collect_ready(self, keep)
    if not events:
      events += stepping.collect_first(self, keep)
    if blocked:                               # their steps in flight may be collected now
      launched += stepping.launch_spans(self, started, blocked)[0]
    busy = bool(launched) or bool(events)
    self._time_launches(t0, launched)
    took = self.clock() - started
    self.seconds_per_partition[self.partition.name] += took
    if busy:
      self.step_s = took if not self.step_s else 0.9 * self.step_s + 0.1 * took
    self._maybe_finish_drain()
    events, self._ready = events + self._ready, []
    return events

  def _time_launches(self, t0: float, launched: list[stepping.InFlight]):
    """A `StepTiming` per step launched in this call (the call's host time shared among them)."""
    if not launched:
      return
    total = time.perf_counter() - t0
    dispatch = sum(f.launched.dispatch_s for f in launched)
    host = max(0.0, total - self.waited_s - dispatch) / len(launched)
    for f in launched:
      w = f.work
      self.timings.append(StepTiming(
          f.launched.shapes[0], host, f.launched.dispatch_s, total,
          sum(len(g.decode) + g.prefill_tokens for g in w), sum(len(g.decode) for g in w)))

  def sync(self):
    """Collect every span's steps in flight (their events come with the next `step()`)."""
    for queue in self._inflight:
      while queue:
        self._ready += stepping.collect(self, queue.popleft())

  # introspection -------------------------------------------------------------------------------
  def request(self, request_id: str) -> list[Sequence]:
    return self._requests[request_id]

  def stats(self) -> dict:
    return introspect.stats(self)

  @property
  def draining(self) -> bool:
    return self._pending is not None

  def kv_usage(self) -> float:
    """The share of KV pages in use (a hybrid model: of the fuller of its two page spaces)."""
    return max(sp.pool.used_share() for sp in self.scheduler.spaces)

  def no_leaks(self) -> bool:
    return introspect.no_leaks(self)

