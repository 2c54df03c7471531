"""Feed a workload to an engine at its arrival times and record what every request saw.

The same loop drives the real engine on the wall clock (waiting sleeps) and the simulated one
(waiting moves the simulated clock), so a simulation and a real run of a trace differ only in the
runtime under the engine. Requests that arrived during a step are queued with their arrival time.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

from flying_jax.bench import report
from flying_jax.bench.traces import Arrival
from flying_jax.sampling import SamplingParams


@dataclasses.dataclass
class Outcome:
  """Per request (arrays in arrival order), seconds from the start of the run."""
  arrival: np.ndarray
  first_token: np.ndarray            # NaN: no token (rejected)
  finish: np.ndarray
  input_tokens: np.ndarray
  output_tokens: np.ndarray
  priority: np.ndarray
  rejected: int
  timeline: list                     # (t, waiting, running, partition name) samples
  switches: list                     # SwitchRecord of the run
  seconds_per_partition: dict
  steps: int
  start: float = 0.0                 # the engine's clock at the start of the run

  def summary(self, window: tuple[float, float] | None = None, priority: int | None = None) -> dict:
    """vLLM's figures (`bench.report.summarize`'s keys; no per-token times, so no ITL and no
    peak): `window` keeps requests that arrived in [a, b), `priority` one class."""
    keep = np.isfinite(self.first_token)
    if window is not None:
      keep &= (self.arrival >= window[0]) & (self.arrival < window[1])
    if priority is not None:
      keep &= self.priority == priority
    arr, first, fin = self.arrival[keep], self.first_token[keep], self.finish[keep]
    out, inp = self.output_tokens[keep], self.input_tokens[keep]
    multi = out > 1
    duration = float(fin.max() - arr.min()) if arr.size else 0.0
    per_s = 1.0 / duration if duration else 0.0
    return {
        "completed": int(keep.sum()), "failed": self.rejected, "duration_s": duration,
        "input_tokens": int(inp.sum()), "output_tokens": int(out.sum()),
        "request_throughput": arr.size * per_s, "output_throughput": float(out.sum()) * per_s,
        "total_token_throughput": float(out.sum() + inp.sum()) * per_s,
        "peak_output_throughput": None, "goodput": None,
        "ttft_ms": report.stats_ms(first - arr),
        "tpot_ms": report.stats_ms((fin[multi] - first[multi]) / (out[multi] - 1)),
        "itl_ms": None,
        "e2e_ms": report.stats_ms(fin - arr),
    }

  def plot(self, path: str, title: str = "") -> str:
    """The timeline PNG of `bench.plot`: offered load, queue depth, TTFT and TPOT, the partition
    in force shaded."""
    from flying_jax.bench.plot import timeline_plot

    done = [(a, f - a, (e - f) / (n - 1) if n > 1 else None, p) for a, f, e, n, p in zip(
        self.arrival, self.first_token, self.finish, self.output_tokens, self.priority)
        if np.isfinite(f)]
    return timeline_plot(self.arrival.tolist(), done, self.timeline, path, title)

  def to_json(self) -> dict:
    return {"summary": self.summary(),
            "requests": {"arrival": self.arrival.tolist(), "first_token": self.first_token.tolist(),
                         "finish": self.finish.tolist(), "input_tokens": self.input_tokens.tolist(),
                         "output_tokens": self.output_tokens.tolist(),
                         "priority": self.priority.tolist()},
            "timeline": [list(t) for t in self.timeline],
            "switches": [{"at": r.requested_at - self.start, "from": str(r.from_width), "to": str(r.to_width),
                          "reason": r.reason, "strategy": r.strategy, "migrated": r.migrated,
                          "recomputed": r.recomputed, "paused": r.paused} for r in self.switches],
            "busy_seconds_per_partition": self.seconds_per_partition, "steps": self.steps}


_runs = itertools.count()


def _params(a: Arrival) -> SamplingParams:
  return SamplingParams(temperature=0.0, max_tokens=max(1, a.output_tokens), ignore_eos=True)


def drive(engine, arrivals: list[Arrival], wait_until=None, sample_every: float = 0.25,
          progress=None) -> Outcome:
  """Run `arrivals` (sorted by time) through `engine` until every request finished.

  `wait_until(t)`: make the engine's clock reach `t` (default: sleep on the wall clock).
  """
  clock = engine.clock
  if wait_until is None:
    wait_until = lambda t: time.sleep(max(0.0, t - clock()))
  n = len(arrivals)
  t0 = clock()
  first = np.full(n, np.nan)
  finish = np.full(n, np.nan)
  outputs = np.zeros(n, np.int64)
  rejected, i, timeline, next_sample = 0, 0, [], 0.0
  prompts: dict[int, list[int]] = {}
  switches_before = len(engine.switches)
  steps_before = engine.steps
  busy_before = dict(engine.seconds_per_partition)
  tag = f"drive{next(_runs)}-"              # request ids of this run, unique on the engine
  while i < n or engine.has_unfinished():
    now = clock() - t0
    while i < n and arrivals[i].at <= now:
      a = arrivals[i]
      ids = prompts.get(a.input_tokens)
      if ids is None:                       # the ids do not matter, only how many
        ids = prompts[a.input_tokens] = [0] * max(1, a.input_tokens)
      try:
        engine.add_request(f"{tag}{i}", ids, _params(a), priority=a.priority,
                           arrival_time=t0 + a.at)
      except ValueError:                    # RequestRejected: longer than anything holds
        rejected += 1
      i += 1
    before = (engine.steps, engine.collected)
    events = engine.step()
    for ev in events:
      seq = ev.seq
      if ev.finished:
        k = int(seq.request_id[len(tag):])
        first[k] = seq.first_token_time - t0 if seq.first_token_time is not None else np.nan
        finish[k] = seq.finish_time - t0
        outputs[k] = len(seq.output_ids)
        engine.release(seq.request_id)
        if progress is not None:
          progress.update(1)
    if now >= next_sample:
      sch = engine.scheduler
      timeline.append((now, len(sch.waiting), sch.num_running(), engine.partition.name))
      next_sample = now + sample_every
    if (engine.steps, engine.collected) == before:     # nothing launched or done: idle
      if i < n:
        wait_until(t0 + arrivals[i].at)
      elif len(engine.paused) and not engine.scheduler.has_work():
        engine.switch(engine.partition, "recompute", reason="resume-paused")
      elif engine.has_unfinished():
        raise RuntimeError("requests are waiting but nothing can be scheduled")
  return Outcome(np.array([a.at for a in arrivals]), first, finish,
                 np.array([a.input_tokens for a in arrivals]), outputs,
                 np.array([a.priority for a in arrivals]), rejected, timeline,
                 engine.switches[switches_before:],
                 {p: s - busy_before.get(p, 0.0) for p, s in engine.seconds_per_partition.items()
                  if s > busy_before.get(p, 0.0)},
                 engine.steps - steps_before, t0)
