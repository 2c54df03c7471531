"""What the engine shows outside: the observation a policy decides on, and an operator's stats.

Pure reads of engine state, no side effects. The facts that never change after start-up (the
compiled widths, what one group of each holds, the mixed partitions) are computed once, in
`StaticFacts`; the rest is read each call.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from flying_jax.engine.policies import Observation


@dataclasses.dataclass(frozen=True)
class StaticFacts:
  widths: tuple[int, ...]          # compiled widths, ascending
  capacity: dict                   # width -> longest sequence one group holds
  mixed: dict                      # compiled mixed partition -> its widest group's width

  @staticmethod
  def of(engine) -> "StaticFacts":
    return StaticFacts(
        widths=tuple(sorted(engine.setups)),
        capacity={w: ws.capacity for w, ws in engine.setups.items()},
        mixed={n: max(p.widths) for n, p in engine.partitions.items() if p.uniform_width is None})


def observe(engine, facts: StaticFacts) -> Observation:
  sch, now = engine.scheduler, time.monotonic()
  running = [s for g in sch.running for s in g]
  inflight = list(sch.waiting) + running
  paused = engine.paused.all()
  return Observation(
      width=engine.width, widths=facts.widths, capacity=facts.capacity, mixed=facts.mixed,
      partition=engine.partition.name, widest=max(engine.partition.widths),
      waiting=len(sch.waiting), running=len(running), paused=len(paused),
      paused_widths=tuple(sorted({s.layout.width for s in paused})),
      waiting_max_length=max((s.max_length() for s in sch.waiting), default=0),
      running_max_length=max((s.max_length() for s in running), default=0),
      max_priority=max((s.priority for s in inflight), default=0),
      priority_inflight=sum(s.priority > 0 for s in inflight),
      oldest_wait_s=max((now - s.arrival_time for s in sch.waiting), default=0.0),
      oldest_paused_s=max((now - s.paused_at for s in paused), default=0.0),
      kv_usage=engine.kv_usage(), step=engine.steps)


def stats(engine) -> dict:
  """What an operator watches: the partition, the queues, KV use and the switches so far."""
  switches = engine.switches
  by_kind = collections.Counter((r.reason, r.strategy) for r in switches)
  cutovers = sorted(r.cutover_s for r in switches)
  return {
      "partition": engine.partition.name,
      "width": engine.width,
      "groups": len(engine.scheduler.groups),
      "running": engine.scheduler.num_running(),
      "waiting": len(engine.scheduler.waiting),
      "paused": len(engine.paused),
      "draining": engine.draining,
      "kv_usage": engine.kv_usage(),
      "steps": engine.steps,
      "switches": len(switches),
      "switches_by_reason_strategy": {f"{r}/{s}": n for (r, s), n in sorted(by_kind.items())},
      "switch_cutover_ms_median": 1e3 * cutovers[len(cutovers) // 2] if cutovers else None,
      "sequences_paused": sum(r.paused for r in switches),
      "sequences_recomputed": sum(r.recomputed + r.abandoned for r in switches),
      "sequences_migrated": sum(r.migrated for r in switches),
      "sequences_preempted": engine.scheduler.preempted_total,
      "sequences_kept": sum(r.kept for r in switches),
      "seconds_per_partition": dict(sorted(engine.seconds_per_partition.items())),
  }
