"""Compiled programs are data: a registry keyed by (span, kind, step shape), built ahead of time.

A span is the run of devices one program covers at one width: all devices for a uniform partition,
part of them for a span of a mixed partition (see `parallel.partitions`). One program per (span,
shape) runs a whole step: token embeddings, every decoder layer (a loop of static trip count over
the layers' stacked weights and KV pools, `model.decoder.layers`; the pools donated and written in
place) and the final norm and logits of the sampled rows (padded to a fixed row count); one more
program per span samples those rows on the device (compiled once per span, not per shape: the
sampler is costly to compile). A step is two dispatches. A hybrid model's sliding layers read
their own (smaller) pools and page tables inside the same loop. Nothing is compiled after `build`: looking up a
missing key raises.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp

from flying_jax.config import Architecture
from flying_jax.model import decoder
from flying_jax.model.attention import KVGeometry
from flying_jax.model.batch import StepShape, meta_struct, unpack
from flying_jax.model.heads import HeadPlan
from flying_jax.model.layers import Step
from flying_jax.model.weights import ResidentWeights, lead, weight_shardings
from flying_jax.parallel import Collectives, MeshSpecs, Span, per_device
from flying_jax.runtime.exec_cache import ExecutableCache
from flying_jax.runtime.sampling_pack import sample_len, unpack_sampling
from flying_jax.sampling import mask_words, sample

SAMPLE_VERSION = 2      # in the sampling programs' cache key: 2 takes the rows' token masks


class MissingProgram(KeyError):
  """A step asked for a program that was not compiled ahead of time (a bug, never a slow path)."""


@dataclasses.dataclass(frozen=True)
class WidthSetup:
  """Everything static about one width: its mesh, head plan and KV geometry."""
  specs: MeshSpecs
  plan: HeadPlan
  geom: KVGeometry
  shapes: tuple[StepShape, ...]
  capacity: int                   # the longest sequence (prompt + generated) one group holds
  span: Span                      # the devices its programs cover
  base: int = 1                   # devices per engine (each holds 1/base of the weights)

  @property
  def width(self) -> int:
    return self.specs.width

  @functools.cached_property
  def decode_only(self) -> dict[int, StepShape]:
    """Decode bucket -> the shape of a step with no prefill, ascending (read every step)."""
    sizes = sorted({s.decode for s in self.shapes})
    local = self.shapes[0].local_tables
    return {d: StepShape(d, 0, self.geom.max_pages, 0, local) for d in sizes}


@dataclasses.dataclass
class ProgramStats:
  key: tuple
  compile_s: float                  # lowering and compiling, or loading from the cache
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  loaded: bool = False              # from the executable cache (`runtime.exec_cache`)


def _step_fn(ws: WidthSetup, shape: StepShape, arch: Architecture, graphs: decoder.Graphs,
             walk: decoder.LayerWalk, weights_struct: ResidentWeights, rows: int, words: int,
             attention: str, platform: str):
  """One whole step on one span but sampling: embeddings, every layer (a loop over the stacked
  layers) and the sampled rows' logits (padded to `rows`). Decode slots may take their token
  from the previous step's sampled ids, passed in as they came out of its sampling program
  (`StepMeta.fed`): the host packs the next step before it knows them. The packed rows start
  with `words` words of sampling fields, handed on to the sampling program untouched."""
  spaces = max(walk.spaces) + 1
  coll = Collectives(ws.width, ws.base)
  steps = tuple(Step(arch, shape, ws.plan, ws.geom, coll, space == 1, attention, platform)
                for space in range(spaces))

  def f(weights: ResidentWeights, k_pools, v_pools, packed_1xL, prev_1xR):
    meta = unpack(packed_1xL[0, words:], shape).fed(prev_1xR[0])
    x = decoder.embed(graphs, weights.embed, meta, steps[0])
    x, k_pools, v_pools = decoder.layers(graphs, weights.layers, k_pools, v_pools, x, meta,
                                         steps, walk)
    logits_RxV = decoder.logits(graphs, weights.head_table, weights.final_norm, x, meta, steps[0])
    logits_1xRxV = jnp.pad(logits_RxV, ((0, rows - shape.rows), (0, 0)))[None]
    return logits_1xRxV, packed_1xL[:, :words], k_pools, v_pools
  s = ws.specs
  g = s.per_group_spec
  pools = (lead(s.per_device_spec),) * spaces
  weights = weight_shardings(weights_struct, arch, s.sharded_spec, s.replicated_spec,
                             ws.plan.reads.vocab)
  return per_device(f, s, (weights, pools, pools, g, g), (g, g, pools, pools))


def _sample_fn(ws: WidthSetup, rows: int, hist: int, banned: int):
  """On-device sampling of a step's logits (one program per span, every step shape's logits
  padded to the same rows); the rows' sampling fields as the step program handed them on, and
  their token masks (`sampling.apply_token_mask`: all ones but for structured output; a
  separate input, so that a constrained step's masks can be computed while its step program
  runs)."""
  def f(logits_1xRxV, samp_1xN, allowed_1xRxW):
    fields = unpack_sampling(samp_1xN[0].reshape(rows, -1), hist, banned)
    out = sample(logits_1xRxV[0], fields, allowed_1xRxW[0])
    return out.tokens[None], out.logprob[None], out.top_ids[None], out.top_logprobs[None]
  s = ws.specs
  g = s.per_group_spec
  return per_device(f, s, (g, g, g), (g, g, g, g))


class ProgramRegistry:
  """AOT-compiled step programs for every span and step shape of one engine."""

  def __init__(self, arch: Architecture, dtype, setups: dict[Span, WidthSetup], pool_structs,
               hist: int, banned: int, rows: int, walk: decoder.LayerWalk,
               attention: str = "xla", cache: ExecutableCache | None = None):
    """`pool_structs`: one device's stacked K (or V) pools of each page space; `walk`: which
    space each layer's KV lives in (`decoder.LayerWalk`); `attention`: the paged-attention
    backend (`attention.attention_backend`); `cache`: where compiled programs are kept between
    runs (`runtime.exec_cache`; None: compile every time)."""
    self.cache = cache or ExecutableCache(None)
    self.arch, self.dtype, self.setups = arch, jnp.dtype(dtype), setups
    self.rows = rows                    # sampled rows per group, every shape padded to it
    self.pool_structs, self.hist, self.banned = tuple(pool_structs), hist, banned
    self.walk, self.attention = walk, attention
    self.lead = rows * sample_len(hist, banned)    # sampling words in front of a step's rows
    self._programs: dict[tuple, Callable] = {}
    self.stats: list[ProgramStats] = []
    self.graphs: decoder.Graphs | None = None     # set by `build`

  def __getitem__(self, key: tuple) -> Callable:
    try:
      return self._programs[key]
    except KeyError:
      raise MissingProgram(f"no compiled program for {key}; compiled: {len(self._programs)}") from None

  def __len__(self):
    return len(self._programs)

  def keys(self):
    return self._programs.keys()

  def _jobs(self):
    for ws in self.setups.values():
      yield ws, None
      for shape in ws.shapes:
        yield ws, shape

  def build(self, weights_abstract: ResidentWeights, blocks, progress=None, threads: int = 2):
    """Lower and compile every program (a few at a time: XLA compiles off the GIL);
    `weights_abstract` and `blocks` (`heads.RowBlocks`): the resident weights' structs and
    row layout."""
    t0 = time.perf_counter()
    self.blocks = blocks
    self.graphs = decoder.Graphs.of(decoder.abstract_model(self.arch, self.dtype, blocks))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      futures = [pool.submit(self._compile, ws, shape, weights_abstract)
                 for ws, shape in self._jobs()]
      for fut in concurrent.futures.as_completed(futures):
        fut.result()
        if progress is not None:
          progress.update(1)
    return time.perf_counter() - t0

  def count(self) -> int:
    return sum(1 + len(ws.shapes) for ws in self.setups.values())

  def lower(self, ws: WidthSetup, shape: StepShape | None, wa: ResidentWeights, platforms=None):
    """The step program of `ws` and `shape` (None: the span's sampling program), lowered (for
    `platforms`, e.g. ("cuda",), when given: a lowering needs no device of that platform)."""
    lower = lambda jitted, args: (jitted.lower(*args) if not platforms else
                                  jitted.trace(*args).lower(lowering_platforms=tuple(platforms)))
    if shape is None:
      return lower(jax.jit(_sample_fn(ws, self.rows, self.hist, self.banned)),
                   self.sample_structs(ws))
    s, g = ws.specs, ws.specs.groups
    retarget = lambda x, to: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=to)
    sh = weight_shardings(wa, self.arch, s.sharded(), s.replicated(), ws.plan.reads.vocab)
    weights = jax.tree.map(retarget, wa, sh)
    stacked = lead(s.per_device())
    pools = tuple(jax.ShapeDtypeStruct((one.shape[0], ws.span.devices * one.shape[1])
                                       + one.shape[2:], one.dtype, sharding=stacked)
                  for one in self.pool_structs)
    platform = platforms[0] if platforms else ws.specs.mesh.devices.flat[0].platform
    fn = _step_fn(ws, shape, self.arch, self.graphs, self.walk, wa, self.rows, self.lead,
                  self.attention, platform)
    args = (weights, pools, pools, meta_struct(g, shape, s.per_group(), self.lead),
            jax.ShapeDtypeStruct((g, self.rows), jnp.int32, sharding=s.per_group()))
    return lower(jax.jit(fn, donate_argnums=(1, 2)), args)

  def cache_key(self, ws: WidthSetup, shape: StepShape) -> tuple:
    """What the step program of `ws` and `shape` is made from (the executable cache adds the
    devices, versions and the package's sources): the weights' structs and the head plan follow
    from the model, dtype, row blocks and mesh."""
    mesh = tuple(ws.specs.mesh.shape.items())
    if shape is None:
      return ("sample", SAMPLE_VERSION, self.arch.vocab_size, mesh, self.rows, self.hist,
              self.banned)
    pools = tuple((tuple(p.shape), str(p.dtype)) for p in self.pool_structs)
    return ("step", self.arch, str(self.dtype), self.blocks, ws.span, mesh, ws.geom, shape,
            self.walk, self.rows, self.hist, self.banned, self.attention, pools)

  def _compile(self, ws: WidthSetup, shape: StepShape | None, wa: ResidentWeights):
    t0 = time.perf_counter()
    compiled, loaded = self.cache.get_or_compile(self.cache_key(ws, shape),
                                                 lambda: self.lower(ws, shape, wa), ws.specs.mesh)
    dt = time.perf_counter() - t0
    key = (ws.span, "sample" if shape is None else "step", shape)
    self._programs[key] = compiled
    mem = compiled.memory_analysis()
    self.stats.append(ProgramStats(
        key, dt, getattr(mem, "argument_size_in_bytes", 0), getattr(mem, "temp_size_in_bytes", 0),
        getattr(mem, "output_size_in_bytes", 0), getattr(mem, "alias_size_in_bytes", 0),
        loaded))

  @property
  def mask_words(self) -> int:
    """32-bit words of one sampled row's token mask."""
    return mask_words(self.arch.vocab_size)

  def sample_structs(self, ws: WidthSetup):
    g, r, sh = ws.specs.groups, self.rows, ws.specs.per_group()
    return (jax.ShapeDtypeStruct((g, r, self.arch.vocab_size), jnp.float32, sharding=sh),
            jax.ShapeDtypeStruct((g, self.lead), jnp.int32, sharding=sh),
            jax.ShapeDtypeStruct((g, r, self.mask_words), jnp.int32, sharding=sh))
