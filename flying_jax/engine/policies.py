"""Policies: what partition the next step should run in, and why.

A policy sees an `Observation` of the engine (queue, running and paused sequences, priorities,
KV use, what each width can hold, recent step times) and returns a `Decision` or None (stay).
The engine applies a decision at the step boundary through `Engine.switch`, and counts the reason.

  static    pin one width;
  load      TP (the widest width) while the engine is quiet, for latency; DP (the narrowest) when
            the queue builds, for throughput; hysteresis so it does not flap, and a limit on how
            long a TP episode may keep waiting requests behind it;
  priority  a latency-critical request (priority >= threshold) is served by the widest width at
            once; the others are paused, not recomputed, and resume in their own layout once no
            latency-critical request is left;
  memory    a request longer than one group of the current width holds moves the engine to the
            narrowest width that holds it (instead of refusing it);
  auto      memory, then priority (with its return to paused sequences' layout), then load.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Observation:
  width: int
  widths: tuple[int, ...]            # compiled widths, ascending
  capacity: dict                     # width -> longest sequence one group holds
  waiting: int
  running: int
  paused: int
  paused_widths: tuple[int, ...]     # widths of the layouts paused sequences wait for
  waiting_max_length: int            # longest prompt + max_tokens among waiting requests
  max_priority: int                  # highest priority among waiting and running requests
  oldest_wait_s: float
  kv_usage: float
  step: int


@dataclasses.dataclass(frozen=True)
class Decision:
  width: int
  strategy: str = "recompute"
  reason: str = ""


class Policy:
  """Base: stay where we are. Subclasses override `decide`."""
  name = "none"
  dynamic = False                    # may switch: requests are checked against every width

  def decide(self, obs: Observation) -> Decision | None:
    return None


@dataclasses.dataclass
class StaticPolicy(Policy):
  width: int
  name = "static"

  def decide(self, obs):
    return Decision(self.width, "drain", "static") if obs.width != self.width else None


@dataclasses.dataclass
class LoadPolicy(Policy):
  high: int = 8                  # in-flight + waiting at or above this: go DP
  low: int = 2                   # at or below this: go TP
  hold_steps: int = 4            # the condition must hold this many steps (hysteresis)
  max_wait_s: float = 2.0        # a request waiting this long ends a TP episode
  strategy: str = "recompute"
  name = "load"
  dynamic = False

  def __post_init__(self):
    self._busy = self._quiet = 0

  def decide(self, obs):
    load = obs.waiting + obs.running
    dp, tp = obs.widths[0], obs.widths[-1]
    self._busy = self._busy + 1 if load >= self.high else 0
    self._quiet = self._quiet + 1 if load <= self.low else 0
    if obs.width != dp and (self._busy >= self.hold_steps or
                            (obs.waiting and obs.oldest_wait_s >= self.max_wait_s)):
      return Decision(dp, self.strategy, "load:busy")
    if obs.width != tp and self._quiet >= self.hold_steps and obs.waiting_max_length <= \
        obs.capacity[tp]:
      return Decision(tp, self.strategy, "load:quiet")
    return None


@dataclasses.dataclass
class PriorityPolicy(Policy):
  threshold: int = 1
  name = "priority"

  def decide(self, obs):
    tp = obs.widths[-1]
    if obs.max_priority >= self.threshold:
      return Decision(tp, "pause", "priority") if obs.width != tp else None
    if obs.paused_widths and obs.width not in obs.paused_widths:
      return Decision(obs.paused_widths[0], "pause", "resume")   # back to what it paused
    return None


@dataclasses.dataclass
class MemoryPolicy(Policy):
  name = "memory"
  dynamic = True

  def decide(self, obs):
    if obs.waiting_max_length <= obs.capacity[obs.width]:
      return None
    fits = [w for w in obs.widths if obs.capacity[w] >= obs.waiting_max_length]
    if not fits:
      return None
    return Decision(fits[0], "recompute", "memory")


@dataclasses.dataclass
class AutoPolicy(Policy):
  load: LoadPolicy = dataclasses.field(default_factory=LoadPolicy)
  priority: PriorityPolicy = dataclasses.field(default_factory=PriorityPolicy)
  memory: MemoryPolicy = dataclasses.field(default_factory=MemoryPolicy)
  name = "auto"
  dynamic = True

  def decide(self, obs):
    for p in (self.memory, self.priority):
      d = p.decide(obs)
      if d is not None:
        return d
    if obs.waiting_max_length > obs.capacity[obs.widths[0]] or obs.max_priority >= \
        self.priority.threshold:
      return None                  # a wide group is needed now: load does not narrow it
    return self.load.decide(obs)


def make_policy(spec: str | Policy | None) -> Policy:
  """`"static:4"`, `"load"`, `"priority"`, `"memory"`, `"auto"` or a Policy (None: stay)."""
  if spec is None or isinstance(spec, Policy):
    return spec or Policy()
  name, _, arg = spec.partition(":")
  if name == "static":
    if not arg.isdigit():
      raise ValueError("the static policy needs a width: static:W")
    return StaticPolicy(int(arg))
  table = {"none": Policy, "load": LoadPolicy, "priority": PriorityPolicy, "memory": MemoryPolicy,
           "auto": AutoPolicy}
  if name not in table or arg:
    raise ValueError(f"unknown policy {spec!r}; use static:W, load, priority, memory or auto")
  return table[name]()
