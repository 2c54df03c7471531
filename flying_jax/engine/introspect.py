"""What the engine shows outside: the observation a policy decides on, and an operator's stats.

Pure reads of engine state, no side effects. The facts that never change after start-up (the
compiled widths, what one group of each holds, the mixed partitions) are computed once, in
`StaticFacts`; the rest is read each call.
"""

from __future__ import annotations

import collections
import dataclasses

from flying_jax.engine.demand import alone_s, predict
from flying_jax.engine.policies import Observation


@dataclasses.dataclass(frozen=True)
class StaticFacts:
  widths: tuple[int, ...]          # compiled widths, ascending
  capacity: dict                   # width -> longest sequence one group holds
  mixed: dict                      # compiled mixed partition -> its widest group's width
  decode_slots: int                # decode slots of one group
  mixed_slots: dict                # compiled mixed partition -> decode slots of its replicas

  @staticmethod
  def of(engine) -> "StaticFacts":
    slots = max(engine.preset.decode_buckets)
    mixed = {n: p for n, p in engine.partitions.items() if p.uniform_width is None}
    return StaticFacts(
        widths=tuple(sorted(engine.setups)),
        capacity={w: ws.capacity for w, ws in engine.setups.items()},
        mixed={n: max(p.widths) for n, p in mixed.items()},
        decode_slots=slots,
        mixed_slots={n: slots * sum(w < max(p.widths) for w in p.widths) for n, p in mixed.items()})


def observe(engine, facts: StaticFacts) -> Observation:
  sch, now = engine.scheduler, engine.clock()
  waiting_longest, oldest_arrival, prio, urgent, _, unstarted, first_prio = _scan(sch.waiting,
                                                                                   now)
  running_longest, running, running_prio, running_urgent, prefilling = 0, 0, None, 0, 0
  for group in sch.running:
    running += len(group)
    longest, _, p, u, pre, first, fp = _scan(group, now)
    unstarted = min(unstarted, first)
    first_prio = max(first_prio, fp)
    running_longest = max(running_longest, longest)
    running_urgent += u
    prefilling += pre
    if p is not None and (running_prio is None or p > running_prio):
      running_prio = p
  paused = engine.paused.all()
  models = engine.demand.step_models(facts.widths)    # every width (mixed ones use them too)
  priorities = [p for p in (prio, running_prio) if p is not None]
  return Observation(
      width=engine.width, widths=facts.widths, capacity=facts.capacity, mixed=facts.mixed,
      partition=engine.partition.name, widest=max(engine.partition.widths),
      waiting=len(sch.waiting), running=running, paused=len(paused),
      paused_widths=tuple(sorted({s.layout.width for s in paused})),
      waiting_max_length=waiting_longest, running_max_length=running_longest,
      max_priority=max(priorities, default=0), priority_inflight=urgent + running_urgent,
      max_priority_unstarted=first_prio,
      oldest_wait_s=now - oldest_arrival if sch.waiting else 0.0,
      oldest_paused_s=max((now - s.paused_at for s in paused), default=0.0),
      kv_usage=engine.kv_usage(), step=engine.steps, prefilling=prefilling,
      decode_slots=facts.decode_slots, oldest_unstarted_s=now - unstarted,
      step_s=engine.step_s, mixed_slots=facts.mixed_slots,
      prompt_tok_s=engine.demand.prompt_tok_s(now),
      predicted=predict(engine.demand, engine.partitions, running - running_urgent, sch.limits,
                        models),
      urgent_per_s=engine.demand.urgent_per_s(now),
      alone_s=alone_s(engine.demand, facts.widths, sch.limits, models) if first_prio else {})


def _scan(seqs, now: float):
  """(longest prompt + max_tokens, earliest arrival, highest priority or None, how many have
  priority > 0, how many have not had their first token, the earliest arrival of those, their
  highest priority or 0) of `seqs`, in one pass: a policy looks every step."""
  longest, earliest, prio, urgent, before_first, unstarted, first_prio = 0, now, None, 0, 0, now, 0
  for s in seqs:
    n = s.prompt_len + s.params.max_tokens
    if n > longest:
      longest = n
    if s.arrival_time < earliest:
      earliest = s.arrival_time
    p = s.priority
    if prio is None or p > prio:
      prio = p
    if p > 0:
      urgent += 1
    if s.first_token_time is None:
      before_first += 1
      if s.arrival_time < unstarted:
        unstarted = s.arrival_time
      if p > first_prio:
        first_prio = p
  return longest, earliest, prio, urgent, before_first, unstarted, first_prio


def stats(engine) -> dict:
  """What an operator watches: the partition, the queues, KV use and the switches so far."""
  switches = engine.switches
  by_kind = collections.Counter((r.reason, r.strategy) for r in switches)
  cutovers = sorted(r.cutover_s for r in switches)
  pending = engine.pending_switch
  return {
      "partition": engine.partition.name,
      "width": engine.width,
      "groups": len(engine.scheduler.groups),
      "running": engine.scheduler.num_running(),
      "waiting": len(engine.scheduler.waiting),
      "paused": len(engine.paused),
      "draining": engine.draining,
      "pending_partition": pending.target.name if pending else None,   # a drain in progress
      "pending_reason": f"{pending.reason}/{pending.strategy}" if pending else None,
      "pending_s": engine.clock() - pending.requested_at if pending else 0.0,
      "superseded_drains": engine.superseded_drains,
      "kv_usage": engine.kv_usage(),
      "steps": engine.steps,
      "switches": len(switches),
      "switches_by_reason_strategy": {f"{r}/{s}": n for (r, s), n in sorted(by_kind.items())},
      "switch_cutover_ms_median": 1e3 * cutovers[len(cutovers) // 2] if cutovers else None,
      "sequences_paused": sum(r.paused for r in switches),
      "sequences_recomputed": sum(r.recomputed + r.abandoned for r in switches)
                              + engine.pause_expired,
      "sequences_pause_expired": engine.pause_expired,
      "sequences_migrated": sum(r.migrated for r in switches),
      "sequences_preempted": engine.scheduler.preempted_total,
      "sequences_kept": sum(r.kept for r in switches),
      "seconds_per_partition": dict(sorted(engine.seconds_per_partition.items())),
      **prefix_stats(engine.prefix_cache),
  }


def prefix_stats(cache) -> dict:
  """The prefix cache's figures (tokens since start-up; pages now)."""
  if cache is None:
    return {"prefix_cache": False, "prefix_cache_queried_tokens": 0, "prefix_cache_hit_tokens": 0,
            "prefix_cache_hit_rate": 0.0, "prefix_cache_pages": 0, "prefix_cache_parked_pages": 0,
            "prefix_cache_evicted_pages": 0}
  return {"prefix_cache": True, "prefix_cache_queried_tokens": cache.queried_tokens,
          "prefix_cache_hit_tokens": cache.hit_tokens, "prefix_cache_hit_rate": cache.hit_rate,
          "prefix_cache_pages": cache.cached_pages(),
          "prefix_cache_parked_pages": cache.parked_pages(),
          "prefix_cache_evicted_pages": cache.evicted}


def no_leaks(engine) -> bool:
  """Every page free (or parked in the prefix cache, held by no request) and nothing running,
  waiting, paused or in flight (events collected but not handed out yet are no leak)."""
  return (all(sp.pool.all_free() for sp in engine.scheduler.spaces)
          and not any(engine._inflight) and not engine.scheduler.has_work()
          and not len(engine.paused))
