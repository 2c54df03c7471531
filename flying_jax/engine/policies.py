"""Policies: what partition the next step should run in, and why.

A policy sees an `Observation` of the engine (queue, running and paused sequences, priorities,
KV use, what each width can hold, the compiled mixed partitions) and returns a `Decision` or None
(stay). A decision names a partition: a width (uniform) or a mixed partition's name ("4+1x4").
The engine applies it at the step boundary through `Engine.switch`, and counts the reason.

  static    pin one partition;
  load      TP (the widest width) while the engine is quiet, for latency; DP (the narrowest) when
            the queue builds, for throughput: merge before the queue builds, split once it has.
            The queue is the requests that have not had their first token (waiting, or admitted
            and still prefilling); it counts as built when it is long AND its oldest request has
            waited `busy_steps` steps' time (the engine's own recent step time: a delay signal
            that adapts to the hardware), so a long queue that TP serves as fast as it comes does
            not move the engine. Hysteresis so it does not flap; TP only while the running
            requests fit in half a TP group's decode slots; a limit on how long a TP episode may
            keep requests without their first token (`max_wait_s`, whatever the step time: on a
            slow machine 16 steps may outlast a burst); running requests migrate their KV;
  priority  a latency-critical request (priority >= threshold) without its first token is
            served by a wide group at once: when every request in flight fits one TP group's
            decode slots, by the widest width, all of them migrated; else, when a mixed partition
            is compiled and its replicas' slots hold the rest, by its TP group while its DP
            replicas keep serving the rest (moved sequences migrate); otherwise by the widest
            width, the others paused for that prefill, to resume in their own layout (the
            requests of the wide layout migrating with them) once no latency-critical request
            waits for its first token (`until_first_token`; off: until none is left). A layout
            held that briefly costs the rest one prefill's wait; the other moves are only made
            when the ordinary requests' predicted first-token time there is within `slack` of
            where they are (`Observation.ttft_s`: the live cost model's prefill time for the
            groups that would carry them, stretched by the queue the live arrival rate makes
            there, `engine.demand`): the few latency-critical requests do not buy their latency
            with everyone else's.
            Paused sequences never wait longer than `max_pause_s`: then they are recomputed in
            the partition in force (no starvation);
  memory    a request longer than the current partition's widest group holds moves the engine to
            a mixed partition with a group that holds it (when other work is in flight), else to
            the narrowest width that holds it (instead of refusing it);
  auto      memory, then priority (with its return to paused sequences' layout), then load;
            a wide layout held for priority requests where the ordinary requests' predicted
            first-token time is `leave` times DP's is left for DP at once; while the queue is
            overloaded (the load policy's busy signal has held), load decides even with priority
            requests in flight: a TP group that cannot keep up is left for DP (no suppression
            without a bound), and priority requests are then served where the rest are for
            `backoff_steps` steps, doubling at each such failure (a pause for one prefill ends
            by itself and is still made).
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Observation:
  width: int | None                  # the width in force (None: a mixed partition)
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
  partition: str = ""                # the partition in force, by name
  widest: int = 0                    # its widest group's width
  mixed: dict = dataclasses.field(default_factory=dict)   # compiled mixed partition -> widest width
  priority_inflight: int = 0         # latency-critical requests waiting or running
  max_priority_unstarted: int = 0    # highest priority among requests without their first token
  running_max_length: int = 0        # longest prompt + max_tokens among running requests
  oldest_paused_s: float = 0.0
  prefilling: int = 0                # running requests that have not had their first token
  decode_slots: int = 0              # decode slots of one group (0: unknown)
  oldest_unstarted_s: float = 0.0    # age of the oldest request without its first token
  step_s: float = 0.0                # the engine's recent time per step (0: not known yet)
  mixed_slots: dict = dataclasses.field(default_factory=dict)
  # ^ compiled mixed partition -> decode slots of its replicas (the groups narrower than its widest)
  prompt_tok_s: float = 0.0          # prompt tokens arriving per second (`engine.demand`)
  predicted: dict = dataclasses.field(default_factory=dict)
  # ^ width or mixed partition -> `demand.Prediction` for the groups that would carry the
  #   ordinary requests there (empty until steps were timed)
  urgent_per_s: float = 0.0          # latency-critical requests arriving per second
  alone_s: dict = dataclasses.field(default_factory=dict)
  # ^ width -> predicted time a group of it prefills a prompt of the mean length alone (filled
  #   while a latency-critical request waits for its first token)

  @property
  def others(self) -> int:
    """Requests in flight that are not latency-critical."""
    return self.waiting + self.running - self.priority_inflight

  @property
  def here(self) -> int | str:
    """The partition in force as `predicted` keys it: its width, or a mixed one's name."""
    return self.width if self.width is not None else self.partition

  def share(self, partition) -> float:
    """The share of `partition`'s predicted prefill rate (for the ordinary requests) that the
    arriving prompts would use: above 1 it builds a queue (0: not known yet)."""
    p = self.predicted.get(partition)
    return p.share(self.prompt_tok_s) if p is not None else 0.0

  def ttft_s(self, partition) -> float | None:
    """An ordinary request's predicted first-token time in `partition` (None: not known)."""
    p = self.predicted.get(partition)
    return p.ttft_s(self.prompt_tok_s) if p is not None else None


@dataclasses.dataclass(frozen=True)
class Decision:
  partition: int | str               # a width (uniform partition) or a mixed partition's name
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
  width: int | str                   # a width or a mixed partition's name
  name = "static"

  def decide(self, obs):
    return Decision(self.width, "drain", "static")        # the engine ignores "stay where you are"


@dataclasses.dataclass
class LoadPolicy(Policy):
  high: int = 8                  # queued (waiting + prefilling) at or above this: go DP, when
  busy_steps: float = 16.0        # ... the oldest of them has waited this many steps' time: a
  #                                queue that the partition in force serves as fast as it comes
  #                                is not a reason to leave it
  low: int = 1                   # at or below this (and few running): go TP
  hold_steps: int = 4            # the condition must hold this many steps (hysteresis)
  max_wait_s: float = 2.0        # a request waiting this long for its first token (queued or
  #                                admitted and prefilling) ends a TP episode
  tp_running: float = 0.5        # TP only while running <= this share of a group's decode slots
  strategy: str = "migrate"
  name = "load"
  dynamic = False

  def __post_init__(self):
    self._busy = self._quiet = 0

  @property
  def overloaded(self) -> bool:
    """The queue has been long and waiting for `hold_steps` steps up to the last decision."""
    return self._busy >= self.hold_steps

  def decide(self, obs):
    queued = obs.waiting + obs.prefilling
    dp, tp = obs.widths[0], obs.widths[-1]
    fits = not obs.decode_slots or obs.running <= self.tp_running * obs.decode_slots
    delayed = obs.oldest_unstarted_s >= self.busy_steps * obs.step_s
    self._busy = self._busy + 1 if queued >= self.high and delayed else 0
    self._quiet = self._quiet + 1 if queued <= self.low and fits else 0
    if obs.width != dp and (self._busy >= self.hold_steps or
                            self._waited_too_long(obs, queued)):
      return Decision(dp, self.strategy, "load:busy")
    if obs.width != tp and self._quiet >= self.hold_steps and obs.waiting_max_length <= \
        obs.capacity[tp]:
      return Decision(tp, self.strategy, "load:quiet")
    return None

  def _waited_too_long(self, obs, queued: int) -> bool:
    """A queued request, or one of several without their first token (a lone long prompt
    is not a queue), has waited `max_wait_s`."""
    return (obs.waiting > 0 and obs.oldest_wait_s >= self.max_wait_s) or (
        queued > 1 and obs.oldest_unstarted_s >= self.max_wait_s)


@dataclasses.dataclass
class PriorityPolicy(Policy):
  threshold: int = 1
  max_pause_s: float = 10.0          # a paused sequence waits at most this long, then recomputes
  mixed: bool = True                 # serve priority in a mixed partition's TP group when busy
  slack: float = 0.1                 # a move for them is only made when the ordinary requests'
  #                                    predicted first-token time there is at most this much
  #                                    worse than where they are (`Observation.ttft_s`) ...
  max_share: float = 0.8             # ... and the arriving prompts would use at most this share
  #                                    of the target's predicted prefill rate (`share`)
  until_first_token: bool = True     # a wide group is held for latency-critical requests until
  #                                    they have their first token (their decode goes on where
  #                                    the rest return); False: until they finish
  max_paused: float = 0.1            # a pause for one prefill only while the rest would spend
  #                                    at most this share of the time paused (predicted: the
  #                                    latency-critical arrivals per second x one prefill alone)
  name = "priority"

  def urgent(self, obs) -> bool:
    """Whether a latency-critical request needs a wide group now."""
    top = obs.max_priority_unstarted if self.until_first_token else obs.max_priority
    return top >= self.threshold

  def decide(self, obs):
    tp, dp = obs.widths[-1], obs.widths[0]
    if obs.paused and obs.oldest_paused_s >= self.max_pause_s:
      return Decision(obs.partition, "recompute", "priority:paused-too-long")
    if self.urgent(obs):
      if obs.width == tp or obs.partition in obs.mixed:
        return None                  # a wide group serves them already
      tp_keeps_up = self.affordable(obs, tp)
      if obs.others > 0 and obs.decode_slots and obs.waiting + obs.running <= \
          obs.decode_slots and tp_keeps_up:
        return Decision(tp, "migrate", "priority")     # everyone fits one TP group: all move
      if self.mixed and obs.mixed and obs.others > 0:
        name = next(iter(obs.mixed))
        room = obs.mixed_slots.get(name, 0)
        if not ((room and obs.others > room) or not self.affordable(obs, name)):
          return Decision(name, "migrate", "priority")
        if not self.until_first_token:
          return None                # its replicas could not carry the rest: serve it here
      if not (self.brief_pause_affordable(obs, tp) if self.until_first_token else tp_keeps_up):
        return None                  # the rest would wait too often, or too long
      return Decision(tp, "pause", "priority")      # (for one prefill: the rest wait that long)
    if obs.paused_widths and obs.width not in obs.paused_widths:
      return Decision(obs.paused_widths[0], "migrate", "resume")   # back to what it paused
    if obs.partition in obs.mixed and max(obs.waiting_max_length, obs.running_max_length) <= \
        obs.capacity[dp]:
      return Decision(dp, "migrate", "priority:done")            # the TP group's work is over
    return None

  def brief_pause_affordable(self, obs, tp) -> bool:
    """Whether pausing the rest for each latency-critical prefill in `tp` keeps them paused at
    most `max_paused` of the time: the throughput they give up (true while not known)."""
    alone = obs.alone_s.get(tp)
    return alone is None or obs.urgent_per_s * alone <= self.max_paused

  def affordable(self, obs, target) -> bool:
    """Whether the ordinary requests' predicted first-token time in `target` is within `slack`
    of where they are and the target keeps up with the arriving prompts with room (`max_share`)
    (true while either is not known)."""
    now, there = obs.ttft_s(obs.here), obs.ttft_s(target)
    if now is None or there is None:
      return True
    return obs.share(target) <= self.max_share and there <= (1 + self.slack) * now


@dataclasses.dataclass
class MemoryPolicy(Policy):
  name = "memory"
  dynamic = True

  def decide(self, obs):
    need = obs.waiting_max_length
    if need <= obs.capacity[obs.widest or obs.width]:
      return None
    if obs.others > 1:             # keep the rest on DP replicas beside a group that holds it
      for name, widest in obs.mixed.items():
        if obs.capacity[widest] >= need:
          return Decision(name, "migrate", "memory")
    fits = [w for w in obs.widths if obs.capacity[w] >= need]
    if not fits:
      return None
    return Decision(fits[0], "recompute", "memory")


@dataclasses.dataclass
class AutoPolicy(Policy):
  load: LoadPolicy = dataclasses.field(default_factory=LoadPolicy)
  priority: PriorityPolicy = dataclasses.field(default_factory=PriorityPolicy)
  memory: MemoryPolicy = dataclasses.field(default_factory=MemoryPolicy)
  leave: float = 1.25             # a wide layout held for priority requests is left for DP
  #                                 when the ordinary requests' predicted first-token time
  #                                 there is this many times DP's (above the priority policy's
  #                                 slack: no flapping at the bound)
  backoff_steps: int = 100        # after a wide group could not keep up, priority requests
  #                                 stay where the rest are this many steps (doubling each time)
  name = "auto"
  dynamic = True

  def __post_init__(self):
    self._failures, self._blocked_until = 0, -1

  def decide(self, obs):
    load = self.load.decide(obs)           # every step: its hysteresis counts every step
    d = self.memory.decide(obs)
    if d is not None:
      return d
    if self.load.overloaded:
      # the queue waits: priority requests are served where the rest are (a wide group that
      # cannot keep up would hold everyone back), until the queue keeps up again
      if load is not None and self.priority.urgent(obs):
        self._fail(obs.step)
      return load if obs.waiting_max_length <= obs.capacity[obs.widths[0]] else None
    dp = obs.widths[0]
    now, there = obs.ttft_s(obs.here), obs.ttft_s(dp)
    if self.priority.urgent(obs) and not obs.paused and obs.here != dp and None not in (
        now, there) and now > self.leave * there and obs.waiting_max_length <= obs.capacity[dp]:
      # the wide layout makes the ordinary requests wait (predicted from the live rates): they
      # go back to DP before the queue shows it, and priority requests stay where the rest are
      # for a while (a failure, as below)
      self._fail(obs.step)
      return Decision(dp, "migrate", "priority:overloaded")
    d = self.priority.decide(obs)
    if d is not None and d.reason in ("priority:done", "resume"):
      self._failures = 0                   # a wide episode that ended as it should
    if d is not None and not (d.reason == "priority" and obs.step < self._blocked_until and
                              not (d.strategy == "pause" and self.priority.until_first_token)):
      return d                     # (a pause for one prefill ends by itself: no back-off)
    if obs.waiting_max_length > obs.capacity[obs.widths[0]] or self.priority.urgent(obs):
      return None                  # a wide group is needed now: load does not narrow it
    return load

  def _fail(self, step: int):
    self._failures += 1
    self._blocked_until = step + self.backoff_steps * 2 ** (self._failures - 1)


def make_policy(spec: str | Policy | None) -> Policy:
  """`"static:4"`, `"static:4+1x4"`, `"load"`, `"priority"`, `"memory"`, `"auto"` or a Policy
  (None: stay)."""
  if spec is None or isinstance(spec, Policy):
    return spec or Policy()
  name, _, arg = spec.partition(":")
  if name == "static":
    if not re.fullmatch(r"\d+(x\d+)?(\+\d+(x\d+)?)*", arg):
      raise ValueError("the static policy needs a partition: static:W or static:4+1x4")
    return StaticPolicy(int(arg) if arg.isdigit() else arg)
  table = {"none": Policy, "load": LoadPolicy, "priority": PriorityPolicy, "memory": MemoryPolicy,
           "auto": AutoPolicy}
  if name not in table or arg:
    raise ValueError(f"unknown policy {spec!r}; use static:W (or static:4+1x4), load, priority, "
                     f"memory or auto")
  return table[name]()
