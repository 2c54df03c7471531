"""The engine: requests in, one step at a time, tokens and text out.

`Engine.step()` asks the scheduler for each group's work, runs the width's compiled programs through
the executor, appends the sampled tokens, applies stop ids, stop strings and length limits, and
frees the pages of every sequence that finished. It is single-threaded by design: one controller
owns the dispatch order (a server runs it on its own thread).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import random
import time

import jax

from flying_jax.config import MeshPreset, ModelCard
from flying_jax.engine import setup as S
from flying_jax.engine.outputs import OutputProcessor
from flying_jax.engine.policies import Observation, Policy, make_policy
from flying_jax.engine.scheduler import Group, Scheduler, SchedulerLimits
from flying_jax.engine.sequence import Sequence, Status
from flying_jax.engine.switching import (PausedSequences, Strategy, SwitchRecord, cut_over,
                                        migrate_sequence)
from flying_jax.kv import DevicePools, PagePool
from flying_jax.model import weights as W
from flying_jax.runtime.executor import Executor
from flying_jax.runtime.programs import ProgramRegistry
from flying_jax.sampling import SamplingParams

log = logging.getLogger("flying_jax")


class RequestRejected(ValueError):
  """A request that can never be served (bad input, or longer than the model or the pool)."""


@dataclasses.dataclass
class SeqEvent:
  seq: Sequence
  new_ids: list[int]
  text_delta: str
  finished: bool


@dataclasses.dataclass
class StepTiming:
  shape: object
  host_s: float          # host work: scheduling, packing, token bookkeeping (not dispatch)
  dispatch_s: float      # enqueueing the compiled programs
  total_s: float         # until the sampled ids are on the host
  tokens: int            # tokens processed (prefill + decode, real ones)
  decoded: int           # decode slots used


class Engine:
  def __init__(self, card: ModelCard, preset: MeshPreset, config: S.EngineConfig = S.EngineConfig(),
               tokenizer=None, devices=None, host_weights: dict | None = None, policy=None):
    self.card, self.preset, self.config = card, preset, config
    self.tokenizer = tokenizer
    devices = list(devices if devices is not None else jax.devices()[: preset.devices])
    if len(devices) < preset.devices:
      raise RuntimeError(f"mesh {preset.name} needs {preset.devices} devices, "
                         f"{len(devices)} available")
    self.devices = devices
    widths = tuple(config.widths or preset.widths)
    self.width = config.width or widths[0]
    if self.width not in widths:
      raise ValueError(f"width {self.width} is not among the compiled widths {widths}")
    needed = getattr(make_policy(policy), "width", None)
    if needed is not None and needed not in widths:          # refused now, not at run time
      raise ValueError(f"policy {policy} needs width {needed}, which is not compiled "
                       f"(compiled: {widths})")
    self.report = S.StartupReport()
    self._build(widths, host_weights)
    self.outputs = OutputProcessor(tokenizer)
    self._partition(self.width)
    self._ids = itertools.count()
    self._requests: dict[str, list[Sequence]] = {}
    self._seed_base = random.getrandbits(31)
    self.timings: collections.deque[StepTiming] = collections.deque(maxlen=4096)
    self.steps = 0
    self.policy = make_policy(policy)
    self.paused = PausedSequences()
    self.seconds_per_width: collections.Counter[int] = collections.Counter()
    self.switches: list[SwitchRecord] = []
    self._pending: SwitchRecord | None = None

  # start-up ------------------------------------------------------------------------------------
  def _build(self, widths, host_weights):
    card, preset, cfg, rep = self.card, self.preset, self.config, self.report
    dtype = S.dtype_of(preset)
    S.enable_compile_cache(cfg.cache_dir)
    self.pages = cfg.pages_per_device or preset.pages_per_device
    self.setups = {w: S.width_setup(card, preset, self.devices, w, self.pages) for w in widths}
    replicated = self.setups[widths[0]].specs.replicated()
    t0 = time.perf_counter()
    if host_weights is None and card.weights.format == "orbax":
      from flying_jax.checkpoints.orbax_store import restore_resident
      self.weights = restore_resident(card.weights.path, card.arch, dtype, replicated)
      jax.block_until_ready(self.weights)
      rep.load_s = time.perf_counter() - t0
    else:
      host = host_weights if host_weights is not None else S.load_weights_host(card, dtype)
      rep.load_s = time.perf_counter() - t0
      self.weights = W.place(host, replicated)
    t0 = time.perf_counter()
    slots = preset.page_tokens * card.arch.n_kv_heads
    self.device_pools = DevicePools.create(card.arch.n_layers, len(self.devices), self.pages, slots,
                                           card.arch.head_dim, dtype,
                                           self.setups[widths[0]].specs.per_device())
    jax.block_until_ready((self.weights, self.device_pools.k, self.device_pools.v))
    rep.place_s = time.perf_counter() - t0
    self.pool = PagePool(len(self.devices), self.pages)
    self.registry = ProgramRegistry(card.arch, dtype, self.setups, self.device_pools.struct(),
                                    cfg.hist_len, cfg.max_banned,
                                    max(s.rows for ws in self.setups.values() for s in ws.shapes))
    bar = _progress(cfg.progress, self.registry.count())
    rep.compile_s = self.registry.build(W.abstract(card.arch, dtype, replicated), bar)
    if bar is not None:
      bar.close()
    self.executor = Executor(self.registry, self.weights, self.device_pools, cfg.hist_len,
                             cfg.max_banned)
    t0 = time.perf_counter()
    self.migrator = S.build_migrator(card, self.setups, self.device_pools) \
        if len(widths) > 1 else None
    rep.compile_s += time.perf_counter() - t0
    rep.warmup_s = self.executor.warm_up(self.setups)
    rep.programs = len(self.registry) + (len(self.migrator) if self.migrator else 0)
    rep.weight_bytes = self.weights.nbytes()
    rep.kv_bytes = self.device_pools.nbytes()
    rep.padding = S.report_padding(card, widths)
    rep.compiled = S.describe_programs(self.registry)
    for line in rep.lines():
      log.info(line)

  def _partition(self, width: int):
    """Serve `width`: a scheduler over its uniform groups and the capacity of one group."""
    ws = self.setups[width]
    groups = [Group(i * width, width) for i in range(ws.specs.groups)]
    modes = tuple(sorted({(s.pre_rows, s.chunk) for s in ws.shapes if s.chunk}))
    limits = SchedulerLimits(max(self.preset.decode_buckets), modes, self.preset.token_budget)
    self.width = width
    self.capacity = ws.capacity
    self.scheduler = Scheduler(self.pool, groups, S.layout_of(ws), limits, self.capacity)

  # switching -----------------------------------------------------------------------------------
  def switch(self, width: int, strategy: str = "recompute", reason: str = "manual") -> SwitchRecord:
    """Serve `width` from the next step on; in-flight sequences follow `strategy`.

    With "drain" the switch happens at the first step boundary where nothing runs any more (no
    admissions until then); "pause", "recompute" and "migrate" cut over at once. Weights do not
    move; with "migrate" the KV of running sequences is re-laid by a compiled program.
    """
    if width not in self.setups:
      raise ValueError(f"width {width} is not among the compiled widths {tuple(self.setups)}")
    strategy = Strategy(strategy)
    if strategy is Strategy.MIGRATE and self.migrator is None:
      raise ValueError("the migrate strategy needs more than one compiled width")
    cap = self.setups[width].capacity
    movable = list(self.scheduler.waiting) + (
        [] if strategy is Strategy.PAUSE else [s for g in self.scheduler.running for s in g])
    too_long = [s.request_id for s in movable if s.max_length() > cap]
    if too_long:
      raise RuntimeError(f"cannot switch to width {width}: requests {sorted(set(too_long))[:5]} "
                         f"are longer than one width-{width} group holds ({cap} tokens)")
    record = SwitchRecord(self.width, width, strategy.value, reason, time.monotonic())
    if strategy is Strategy.DRAIN:
      self.scheduler.admitting = False
      self._pending = record
      self._maybe_finish_drain()
    else:
      self._cut_over(record, strategy)
    return record

  def observe(self) -> Observation:
    sch, now = self.scheduler, time.monotonic()
    inflight = list(sch.waiting) + [s for g in sch.running for s in g]
    return Observation(
        width=self.width, widths=tuple(sorted(self.setups)),
        capacity={w: ws.capacity for w, ws in self.setups.items()},
        waiting=len(sch.waiting), running=sch.num_running(), paused=len(self.paused),
        paused_widths=tuple(sorted({s.layout.width for s in self.paused.all()})),
        waiting_max_length=max((s.max_length() for s in sch.waiting), default=0),
        max_priority=max((s.priority for s in inflight), default=0),
        oldest_wait_s=max((now - s.arrival_time for s in sch.waiting), default=0.0),
        kv_usage=self.kv_usage(), step=self.steps)

  def _apply_policy(self):
    if self._pending is not None or type(self.policy) is Policy:
      return
    decision = self.policy.decide(self.observe())
    if decision is not None and decision.width != self.width:
      try:
        self.switch(decision.width, decision.strategy, decision.reason)
      except RuntimeError as e:                    # e.g. an in-flight request too long for it
        log.info("policy %s: switch to %d refused: %s", self.policy.name, decision.width, e)

  def _migrate_one(self, seq: Sequence) -> int | None:
    """Re-lay a running sequence's KV into a group of the new partition (None: no room)."""
    slots = self.preset.page_tokens * self.card.arch.n_kv_heads
    return migrate_sequence(seq, self.scheduler, self.pool, self.migrator, self.device_pools,
                            self.card.arch, self.pages, slots)

  def _maybe_finish_drain(self):
    if self._pending is not None and self.scheduler.num_running() == 0:
      record, self._pending = self._pending, None
      self._cut_over(record, Strategy.DRAIN)     # nothing runs: waiting ones move, paused stay

  def _cut_over(self, record: SwitchRecord, strategy: Strategy):
    old = self.scheduler
    self._partition(record.to_width)
    cut_over(old, self.scheduler, strategy, self.paused, record, self._migrate_one)
    self.switches.append(record)
    log.info("switch %d -> %d (%s, %s): %d paused, %d recomputed, %d resumed, %d abandoned, "
             "%.2f ms", record.from_width, record.to_width, record.strategy, record.reason,
             record.paused, record.recomputed, record.resumed, record.abandoned,
             1e3 * record.cutover_s)

  def set_width(self, width: int):
    """Serve another compiled width from the next step on; only while no request is in flight."""
    if width not in self.setups:
      raise ValueError(f"width {width} is not among the compiled widths {tuple(self.setups)}")
    if not self.no_leaks():
      raise RuntimeError(f"cannot switch to width {width} while requests are running or waiting "
                         f"({self.scheduler.num_running()} running, "
                         f"{len(self.scheduler.waiting)} waiting)")
    self._partition(width)

  # requests ------------------------------------------------------------------------------------
  def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                  priority: int = 0) -> list[Sequence]:
    """Queue a request (n sequences); raises RequestRejected if it can never be served."""
    self._validate(request_id, prompt_ids, params)
    stop = set(params.stop_token_ids)
    if not params.ignore_eos:
      stop |= set(self.card.tokenizer.stop_ids)
    base = params.seed if params.seed is not None else self._seed_base + next(self._ids) * 7919
    seqs = [Sequence(next(self._ids), request_id, i, list(prompt_ids), params, base + i,
                     frozenset(stop), priority) for i in range(params.n)]
    self._requests[request_id] = seqs
    for s in seqs:
      self.scheduler.add(s)
    return seqs

  def _validate(self, request_id, prompt_ids, params):
    if request_id in self._requests:
      raise RequestRejected(f"request id {request_id!r} is already in use")
    if not isinstance(params, SamplingParams):
      raise RequestRejected("params must be a SamplingParams")
    if not prompt_ids:
      raise RequestRejected("the prompt is empty")
    v = self.card.arch.vocab_size
    bad = [t for t in prompt_ids if not 0 <= int(t) < v]
    if bad:
      raise RequestRejected(f"token ids outside the vocabulary [0, {v}): {bad[:5]}")
    total = len(prompt_ids) + params.max_tokens
    width, cap = self.width, self.capacity
    if self.policy.dynamic:                       # the policy may move to a wider partition
      width = max(self.setups, key=lambda w: self.setups[w].capacity)
      cap = self.setups[width].capacity
    if total > cap:
      raise RequestRejected(
          f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
          f"the longest sequence this engine can hold ({cap} tokens: model context "
          f"{self.card.arch.max_context}, KV pool of one width-{width} group, policy "
          f"{self.policy.name})")

  def abort(self, request_id: str) -> bool:
    seqs = self._requests.pop(request_id, None)
    if seqs is None:
      return False
    for s in seqs:
      if s.status is Status.PAUSED and self.paused.remove(s):
        self.pool.release(s.first_device, s.layout.width, s.pages)
        s.pages = []
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
    return self.scheduler.has_work() or len(self.paused) > 0

  # one step ------------------------------------------------------------------------------------
  def step(self) -> list[SeqEvent]:
    t0 = time.perf_counter()
    self._apply_policy()
    work = self.scheduler.schedule()
    if all(w.empty for w in work):
      return []
    ws = self.setups[self.width]
    t_sched = time.perf_counter() - t0
    try:
      result = self.executor.run(ws, work, self.outputs.banned_ids)
    except Exception as e:  # a failed step fails its sequences, frees their pages, and is logged
      log.exception("step failed")
      return self._fail(work, f"{type(e).__name__}: {e}")
    t1 = time.perf_counter()
    events = []
    for g, w in enumerate(work):
      for i, seq in enumerate(w.decode):
        seq.computed += 1
        events.append(self._accept(seq, result, g, i))
      for j, pre in enumerate(w.prefills):
        seq = pre.seq
        seq.computed += pre.length
        if seq.scheduled_time is None:
          seq.scheduled_time = t0
        if pre.samples:
          events.append(self._accept(seq, result, g, result.shape.decode + j))
    self.steps += 1
    n_tok = sum(len(w.decode) + w.prefill_tokens for w in work)
    sched_s = t_sched + result.host_s + (time.perf_counter() - t1)
    total_s = time.perf_counter() - t0
    self.seconds_per_width[self.width] += total_s
    self.timings.append(StepTiming(result.shape, sched_s, result.dispatch_s, total_s, n_tok,
                                   sum(len(w.decode) for w in work)))
    self._maybe_finish_drain()
    return events

  def _fail(self, work, message: str) -> list[SeqEvent]:
    events = []
    for w in work:
      for seq in w.decode + [p.seq for p in w.prefills]:
        seq.error = message
        self.scheduler.remove(seq)
        self.outputs.finish(seq, "error")
        events.append(SeqEvent(seq, [], "", True))
    return events

  def _accept(self, seq: Sequence, result, g: int, row: int) -> SeqEvent:
    token = int(result.tokens[g, row])
    lp = None
    if result.logprob is not None and seq.params.logprobs is not None:
      k = seq.params.logprobs
      lp = (float(result.logprob[g, row]),
            list(zip(result.top_ids[g, row, :k].tolist(), result.top_logprobs[g, row, :k].tolist())))
    delta, finished = self.outputs.append(seq, token, lp, self.capacity)
    if finished:
      self.scheduler.remove(seq)
    return SeqEvent(seq, [token], delta, finished)

  # introspection -------------------------------------------------------------------------------
  def request(self, request_id: str) -> list[Sequence]:
    return self._requests[request_id]

  def stats(self) -> dict:
    """What an operator watches: the partition, the queues, KV use and the switches so far."""
    by_kind = collections.Counter((r.reason, r.strategy) for r in self.switches)
    cutovers = sorted(r.cutover_s for r in self.switches)
    return {
        "width": self.width,
        "groups": len(self.scheduler.groups),
        "running": self.scheduler.num_running(),
        "waiting": len(self.scheduler.waiting),
        "paused": len(self.paused),
        "draining": self._pending is not None,
        "kv_usage": self.kv_usage(),
        "steps": self.steps,
        "switches": len(self.switches),
        "switches_by_reason_strategy": {f"{r}/{s}": n for (r, s), n in sorted(by_kind.items())},
        "switch_cutover_ms_median": 1e3 * cutovers[len(cutovers) // 2] if cutovers else None,
        "sequences_paused": sum(r.paused for r in self.switches),
        "sequences_recomputed": sum(r.recomputed + r.abandoned for r in self.switches),
        "sequences_migrated": sum(r.migrated for r in self.switches),
        "sequences_preempted": self.scheduler.preempted_total,
        "seconds_per_width": dict(sorted(self.seconds_per_width.items())),
    }

  def kv_usage(self) -> float:
    return float(self.pool.used_fraction().mean())

  def no_leaks(self) -> bool:
    return self.pool.all_free() and not self.has_unfinished()


def _progress(enabled: bool, total: int):
  if not enabled:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc="compiling programs", unit="prog")
