"""Turn one step's group work into packed arrays and run the partition's compiled programs.

The host builds one int32 row per group (the sampling fields of its rows, then tokens, positions,
KV write slots, page tables; a hybrid model's sliding layers get their own tables and slots),
transfers it (one array per span) and dispatches the step's program and the sampling program
asynchronously (`launch`); the sampled ids (and logprobs when a row asked for them) start their
copy to the host at once and are read by `collect`; `ready` and `wait_any` tell the engine which
span's step is done (each span of a mixed partition is launched and collected on its own).

Across several processes (`flying_jax.cluster`) every process dispatches the same programs: the
leader hands each launch's packed rows to `mirror` before dispatching them (a follower replays
them with `run_span`), and the sampled ids are gathered onto every device of the span
(`gather`) so that the leader reads the groups whose devices another process holds.

A step may be launched before the previous one is collected (the engine overlaps the host's work
with the device's): a decode slot whose token the previous step samples takes it from that step's
sampled ids on the device (`StepMeta.feed`), so the host never waits for it to pack a step.

Rows under structured output sample under a token mask (`sampling_pack.token_masks`), the
sampling program's third input (a constant all-ones array when no row is constrained). A row's
mask depends on the token before it: when that one is still on the device, `launch(...,
defer=True)` dispatches the step program alone and `sample` dispatches the sampling program once
the previous step is collected and the masks are computed, while the step program runs.
Structured output is refused across processes (the followers would need the masks).
"""

from __future__ import annotations

import bisect
import dataclasses
import time

import jax
import numpy as np

from flying_jax.engine.scheduler import GroupWork
from flying_jax.model.batch import HostBatch, StepShape
from flying_jax.runtime.programs import ProgramRegistry, WidthSetup
from flying_jax.runtime.resident import Resident
from flying_jax.runtime.sampling_pack import pack_one, set_dynamic, token_masks
from flying_jax.sampling import RowSpec


@dataclasses.dataclass
class StepResult:
  tokens: np.ndarray                  # [G, R]
  logprob: np.ndarray | None          # [G, R]
  top_ids: np.ndarray | None          # [G, R, TOPN]
  top_logprobs: np.ndarray | None
  logits: list                        # per span [G_span, R, V] on device, fetched only on demand
  shapes: list[StepShape]             # per span
  group_shapes: list[StepShape]       # per group: its span's shape
  host_s: float                       # building the packed arrays and handing them to JAX
  dispatch_s: float                   # enqueueing the programs (may include execution on CPU)

  @property
  def shape(self) -> StepShape:
    return self.shapes[0]

  def row(self, g: int, i: int, prefill: bool) -> int:
    """The sampled row of group g's i-th decode slot, or of its i-th prefill row."""
    return self.group_shapes[g].sampled_row(i, prefill)

  def logits_of(self, g: int) -> np.ndarray:
    """[R, V] logits of group g (a device-to-host copy: for tests and diagnostics)."""
    for arr, first, n in self._spans():
      if g < first + n:
        return np.asarray(arr[g - first])
    raise IndexError(g)

  def _spans(self):
    first = 0
    for arr in self.logits:
      yield arr, first, arr.shape[0]
      first += arr.shape[0]


def pick_shape(ws: WidthSetup, work: list[GroupWork]) -> StepShape:
  """The smallest compiled bucket that holds every group's decode slots and prefill rows."""
  d = max(len(w.decode) for w in work)
  r = max(len(w.prefills) for w in work)
  c = max((p.length for w in work for p in w.prefills), default=0)
  buckets = ws.decode_only
  decodes = list(buckets)
  dd = decodes[bisect.bisect_left(decodes, d)]
  if not r:
    return buckets[dd]
  fits = [s for s in ws.shapes if s.decode == dd and s.pre_rows >= r and s.chunk >= c]
  if not fits:
    raise ValueError(f"no compiled step shape holds {d} decode slots and {r} prefill rows of "
                     f"up to {c} tokens")
  return min(fits, key=lambda s: (s.tokens, s.pre_rows))


@dataclasses.dataclass
class Launched:
  """A step dispatched and not yet collected: per span, its programs' outputs on the device."""
  spans: tuple                        # the WidthSetups it ran on
  work: list[GroupWork]
  outs: list                          # per span (tokens, logprob, top ids, top logprobs, logits)
  shapes: list[StepShape]
  group_shapes: list[StepShape]
  wants_logprobs: bool
  host_s: float
  dispatch_s: float
  reads: list | None = None           # per span, what the host reads (`outs` unless gathered;
  #                                     None only for the simulator's steps)
  number: int = 0                     # launches counted from 1 (the followers' handle)
  staged: list | None = None          # launched with `defer`: per span (setup, shape, work,
  #                                     logits, sampling fields) until `Executor.sample`
  mask_for: object = None             # fills the constrained rows' masks (`token_masks`)
  error: Exception | None = None      # its deferred sampling failed (`collect` raises it)


class Executor:
  overlaps = True                   # `launch` returns before the step's results are on the host

  def __init__(self, registry: ProgramRegistry, resident: Resident, hist_len: int, max_banned: int):
    self.registry, self.resident = registry, resident
    self.hist_len, self.max_banned = hist_len, max_banned
    self._no_prev: dict = {}
    self._free: dict = {}           # span -> all-ones token masks (no row constrained)
    self._pad = pack_one(None, hist_len, max_banned)     # a padding row's sampling fields
    self.mirror = None              # the leader of several processes: called with each launch
    self._gathers: dict | None = None    # span -> program replicating the sampled ids (cluster)
    self._launches = 0
    self._collected: list[int] = []       # launches collected since the last one mirrored

  def gather_everywhere(self):
    """Replicate each step's sampled ids over its span's devices, as a process that does not
    hold every device needs to read them (every process must do the same). The programs that do
    it are compiled here, at start-up, from the sampling programs' outputs."""
    self._gathers = {}
    for span, ws in self.registry.setups.items():
      sampled = self.registry[(span, "sample", None)].out_info[:4]
      self._gathers[span] = jax.jit(lambda *x: x, out_shardings=ws.specs.replicated()).lower(
          *sampled).compile()

  # host side -----------------------------------------------------------------------------------
  def build(self, ws: WidthSetup, work: list[GroupWork], shape: StepShape, banned_for):
    """The packed step rows of one span's groups ([G, words]: sampling fields, then the step's
    metadata) and whether a row asks for logprobs. A decoding sequence whose last token is still
    on the device (`Sequence.pending`) reads it from the previous step's sampled row
    `feed_row`."""
    g = len(work)
    hb = HostBatch(g, shape, self.registry.lead)
    f = hb.fields
    geom = ws.geom
    tpp, slots = geom.tokens_per_page, geom.slots
    blk = geom.pages_per_block * tpp
    samp = hb.lead.reshape(g, self.registry.rows, self._pad.size)
    samp[:] = self._pad
    wants_logprobs = False
    f["rows"][:] = np.arange(shape.rows)            # row i samples token i; prefill rows below
    for gi, w in enumerate(work):
      for i, seq in enumerate(w.decode):
        pos = seq.computed
        if seq.pending:
          f["feed"][gi, i] = seq.feed_row + 1
        else:
          f["tokens"][gi, i] = seq.token_at(pos)
        f["positions"][gi, i] = pos
        f["dec_len"][gi, i] = pos + 1
        wants_logprobs |= self._sampling_row(seq, banned_for(seq), samp[gi, i])
      for j, pre in enumerate(w.prefills):
        seq, n, start = pre.seq, pre.length, pre.start
        at = shape.decode + j * shape.chunk
        f["tokens"][gi, at:at + n] = seq.tokens(start, start + n)
        f["positions"][gi, at:at + n] = np.arange(start, start + n)
        f["pre_len"][gi, j] = start + n
        f["rows"][gi, shape.decode + j] = at + n - 1
        if pre.samples:
          r = shape.decode + j
          wants_logprobs |= self._sampling_row(seq, banned_for(seq), samp[gi, r])
      _tables(f, gi, w, shape, tpp, slots, "")
      if shape.local_tables:
        _tables(f, gi, w, shape, tpp, slots, "local_")
      f["n_blocks"][gi, 0] = -(-int(f["dec_len"][gi].max(initial=0)) // blk)
      f["n_blocks"][gi, 1] = -(-int(f["pre_len"][gi].max(initial=0)) // blk)
    return hb.packed, wants_logprobs

  def _sampling_row(self, seq, banned, out: np.ndarray) -> bool:
    """Write `seq`'s sampling row (packed once per sequence, then its step counter, output
    history and banned ids); returns whether it asks for logprobs."""
    p = seq.params
    if seq.sampling_row is None:
      seq.sampling_row = pack_one(RowSpec(params=p, seed=seq.seed, step=0,
                                          prompt_ids=seq.prompt_ids), self.hist_len,
                                  self.max_banned)
    out[:] = seq.sampling_row
    set_dynamic(out, seq.generated, seq.output_ids, banned, self.hist_len, self.max_banned,
                p.has_penalties)
    return p.logprobs is not None

  # device side ---------------------------------------------------------------------------------
  def launch(self, spans: list[WidthSetup], work: list[GroupWork], banned_for,
             prev: Launched | None = None, mask_for=None, defer: bool = False) -> Launched:
    """Dispatch one step of a partition: `spans` in device order, `work` one entry per group of
    them; `prev`: the step before it when that one is not collected yet (the same spans), whose
    sampled ids feed decode slots on the device. `mask_for(rows, out)`: writes the token masks
    of the constrained rows (`sampling_pack.token_masks`; None: no row is constrained);
    `defer`: leave the sampling programs to `sample`."""
    if prev is not None and (prev.spans != tuple(spans) or prev.staged is not None):
      raise ValueError("a step can only follow an uncollected step of the same partition "
                       "whose sampling is dispatched")
    if mask_for is not None and self.mirror is not None:
      raise ValueError("structured output is not supported when the engine runs across "
                       "processes")
    host_s = dispatch_s = 0.0
    outs, reads, shapes, group_shapes, wants = [], [], [], [], False
    first = 0
    built, parts, staged = [], [], []
    self._launches += 1
    for k, ws in enumerate(spans):
      t0 = time.perf_counter()
      part = work[first:first + ws.specs.groups]
      first += ws.specs.groups
      shape = pick_shape(ws, part)
      packed, wants_logprobs = self.build(ws, part, shape, banned_for)
      built.append((ws.span, shape, packed))
      parts.append(part)
      host_s += time.perf_counter() - t0
      shapes.append(shape)
      group_shapes += [shape] * ws.specs.groups
      wants |= wants_logprobs
    if self.mirror is not None:
      t0 = time.perf_counter()
      done, self._collected = self._collected, []
      self.mirror(("launch", self._launches, built, prev.number if prev is not None else 0, done))
      host_s += time.perf_counter() - t0
    for k, (ws, (_, shape, packed)) in enumerate(zip(spans, built)):
      fed = prev.outs[k][0] if prev is not None else None
      if defer:
        t1 = time.perf_counter()
        staged.append((ws, shape, parts[k]) + self.run_step(ws, shape, packed, fed))
        dispatch_s += time.perf_counter() - t1
        continue
      t0 = time.perf_counter()
      allowed = self.masks(ws, parts[k], shape, mask_for)
      t1 = time.perf_counter()
      host_s += t1 - t0
      out, read = self.run_span(ws, shape, packed, fed, allowed)
      self._start_copies(read, wants)
      outs.append(out)
      reads.append(read)
      dispatch_s += time.perf_counter() - t1
    return Launched(tuple(spans), work, outs, shapes, group_shapes, wants, host_s, dispatch_s,
                    reads, self._launches, staged or None, mask_for)

  def sample(self, launched: Launched):
    """Dispatch the sampling programs of a step launched with `defer`, the token masks computed
    now (its rows' previous tokens are on the host); a failure is kept for `collect`."""
    staged, launched.staged = launched.staged, None
    try:
      for ws, shape, part, logits, samp in staged:
        allowed = self.masks(ws, part, shape, launched.mask_for)
        out, read = self.run_sample(ws, logits, samp, allowed)
        self._start_copies(read, launched.wants_logprobs)
        launched.outs.append(out)
        launched.reads.append(read)
    except Exception as e:  # noqa: BLE001 - the step fails when collected, as a launch would
      launched.error = e

  def masks(self, ws: WidthSetup, work: list[GroupWork], shape: StepShape, mask_for):
    """The span's token masks on its devices, or None when no row is constrained."""
    if mask_for is None:
      return None
    reg = self.registry
    out = token_masks(work, shape, reg.rows, reg.mask_words, mask_for)
    return None if out is None else jax.device_put(out, ws.specs.per_group())

  @staticmethod
  def _start_copies(read, wants_logprobs: bool):
    for x in read[:4] if wants_logprobs else read[:1]:
      x.copy_to_host_async()

  def run_span(self, ws: WidthSetup, shape: StepShape, packed: np.ndarray, fed=None,
               allowed=None):
    """Put one span's packed rows on its devices and dispatch its programs; returns (outputs,
    what the host reads of them). `fed`: the previous step's sampled ids (None: none);
    `allowed`: the rows' token masks on the span (None: every row free)."""
    return self.run_sample(ws, *self.run_step(ws, shape, packed, fed), allowed)

  def run_step(self, ws: WidthSetup, shape: StepShape, packed: np.ndarray, fed=None):
    """Dispatch one span's step program; returns (logits, sampling fields) on its devices."""
    packed = jax.device_put(packed, ws.specs.per_group())
    return self.dispatch_step(ws, shape, packed, fed if fed is not None else self.no_prev(ws))

  def run_sample(self, ws: WidthSetup, logits, samp, allowed=None):
    """Dispatch one span's sampling program; returns (outputs, what the host reads)."""
    if allowed is None:
      allowed = self.all_allowed(ws)
    out = self.registry[(ws.span, "sample", None)](logits, samp, allowed) + (logits,)
    if self._gathers is None:
      return out, out
    return out, self._gathers[ws.span](*out[:4]) + (out[4],)

  def collect(self, launched: Launched) -> StepResult:
    """Wait for a launched step's sampled ids (and logprobs) on the host."""
    if launched.error is not None or launched.staged is not None:
      raise launched.error or RuntimeError("a step collected before its sampling was dispatched")
    if self.mirror is not None:
      self._collected.append(launched.number)       # told with the next launch
    outs = launched.reads
    if len(outs) == 1:
      fetch = lambda i: np.asarray(outs[0][i])
    else:
      fetch = lambda i: np.concatenate([np.asarray(o[i]) for o in outs])
    tokens = fetch(0)
    wants = launched.wants_logprobs
    lp, ti, tl = (fetch(1), fetch(2), fetch(3)) if wants else (None, None, None)
    return StepResult(tokens, lp, ti, tl, [o[4] for o in outs], launched.shapes,
                      launched.group_shapes, launched.host_s, launched.dispatch_s)

  def ready(self, launched: Launched) -> bool:
    """Whether a launched step's sampled ids are computed (collecting it will not wait)."""
    if launched.error is not None:
      return True
    return launched.staged is None and all(out[0].is_ready() for out in launched.reads)

  def wait_any(self, launched: list[Launched], poll_s: float = 1e-4) -> int:
    """The index of the first of `launched` to be ready, waiting for it (spans run
    independently: no one of them is waited for while another is done)."""
    while True:
      for i, one in enumerate(launched):
        if self.ready(one):
          return i
      time.sleep(poll_s)

  def no_prev(self, ws: WidthSetup):
    """Sampled ids of no previous step (no slot reads them), on the span's devices."""
    got = self._no_prev.get(ws.span)
    if got is None:
      got = self._no_prev[ws.span] = jax.device_put(
          np.zeros((ws.specs.groups, self.registry.rows), np.int32), ws.specs.per_group())
    return got

  def all_allowed(self, ws: WidthSetup):
    """Token masks of no constrained row (all ones), on the span's devices."""
    got = self._free.get(ws.span)
    if got is None:
      reg = self.registry
      got = self._free[ws.span] = jax.device_put(
          np.full((ws.specs.groups, reg.rows, reg.mask_words), -1, np.int32),
          ws.specs.per_group())
    return got

  def warm_up(self, partitions) -> float:
    """Run programs once on an all-padding batch (KV writes go to the null page): first runs
    set up what a device sets up lazily (collective communicators, kernels' modules).

    `partitions`: lists of spans that together cover every compiled span (the pools are arranged
    for each list in turn).
    """
    t0 = time.perf_counter()
    done = set()
    for spans in partitions:
      todo = [ws for ws in spans if ws.span not in done]
      if not todo:
        continue
      self.resident.arrange(tuple(ws.span for ws in spans))
      for ws in todo:
        done.add(ws.span)
        idle = [GroupWork(decode=[]) for _ in range(ws.specs.groups)]
        for shape in ws.shapes:
          packed, _ = self.build(ws, idle, shape, lambda seq: [])
          jax.block_until_ready(self.run_span(ws, shape, packed)[0])
    self.resident.merge()
    return time.perf_counter() - t0

  def dispatch_step(self, ws: WidthSetup, shape: StepShape, packed, fed):
    """Enqueue one span's step program; returns (logits, sampling fields). The step's KV lands
    in place in the span's pools (donated and given back); `packed`: the step's rows (`build`),
    of which the step program hands the sampling fields on to the sampling program; `fed`: the
    previous step's sampled ids on the span (`StepMeta.feed`)."""
    reg, span = self.registry, ws.span
    w, pools = self.resident.weights_for(span), self.resident.pools_for(span)
    logits, samp, pools.k[:], pools.v[:] = reg[(span, "step", shape)](
        w, tuple(pools.k), tuple(pools.v), packed, fed)
    return logits, samp


def _tables(f, gi: int, w: GroupWork, shape: StepShape, tpp: int, slots: int, prefix: str):
  """Group gi's page tables and KV write slots of one page space: the sequences' `kv` tables
  (prefix "") or a hybrid model's sliding-layer `local` ones (prefix "local_")."""
  table = (lambda s: s.local.pages) if prefix else (lambda s: s.kv.pages)
  base, dec, pre = f[prefix + "write_base"], f[prefix + "dec_table"], f[prefix + "pre_table"]
  for i, seq in enumerate(w.decode):
    pages, pos = table(seq), seq.computed
    base[gi, i] = pages[pos // tpp] * slots + pos % tpp
    dec[gi, i, :len(pages)] = pages
  for j, p in enumerate(w.prefills):
    pages = table(p.seq)
    at = shape.decode + j * shape.chunk
    pos = np.arange(p.start, p.start + p.length)
    base[gi, at:at + p.length] = np.asarray(pages)[pos // tpp] * slots + pos % tpp
    pre[gi, j, :len(pages)] = pages

