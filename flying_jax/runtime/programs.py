"""Compiled programs are data: a registry keyed by (span, kind, step shape), built ahead of time.

A span is the run of devices one program covers at one width: all devices for a uniform partition,
part of them for a span of a mixed partition (see `parallel.partitions`).
Three kinds per (span, shape): `embed` (token ids -> activations), `layer` (one decoder layer,
called once per layer with that layer's resident weights and KV pools, pools and activations
donated) and `head` (final norm and logits of the sampled rows, padded to a fixed row count), plus
one `sample` program per span (on-device sampling of those rows). A hybrid model's sliding layers
run `layer_local` instead of `layer`: the same layer over their own (smaller) pools, reading their
own page tables. Nothing is compiled after `build`:
looking up a missing key raises.
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
from flying_jax.model.weights import ResidentWeights, weight_shardings
from flying_jax.parallel import Collectives, MeshSpecs, Span, per_device
from flying_jax.runtime.sampling_pack import SAMPLE_F32, sample_i32_len, unpack_sampling
from flying_jax.sampling import sample


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
  compile_s: float
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int


def _vocab_spec(ws: WidthSetup):
  """How a program sees the embeddings: split by vocabulary rows, or whole."""
  return ws.specs.sharded_spec if ws.plan.reads.vocab else ws.specs.replicated_spec


def _step(ws: WidthSetup, shape: StepShape, arch: Architecture, local: bool = False,
          attention: str = "xla") -> Step:
  return Step(arch, shape, ws.plan, ws.geom, Collectives(ws.width, ws.base), local, attention,
              ws.specs.mesh.devices.flat[0].platform)


def _embed_fn(ws: WidthSetup, shape: StepShape, arch: Architecture, graphs: decoder.Graphs):
  step = _step(ws, shape, arch)

  def f(embed_state, meta_1xL):
    return decoder.embed(graphs, embed_state, unpack(meta_1xL[0], shape), step)[None]
  s = ws.specs
  return per_device(f, s, (_vocab_spec(ws), s.per_group_spec), s.per_group_spec)


def _layer_fn(ws: WidthSetup, shape: StepShape, arch: Architecture, graphs: decoder.Graphs,
              layer_struct, local: bool = False, attention: str = "xla"):
  step = _step(ws, shape, arch, local, attention)

  def f(layer_state, k_pool, v_pool, x_1xTxD, meta_1xL):
    x, k_pool, v_pool = decoder.layer(graphs, layer_state, k_pool, v_pool, x_1xTxD[0],
                                      unpack(meta_1xL[0], shape), step)
    return x[None], k_pool, v_pool
  s = ws.specs
  weights = weight_shardings(layer_struct, arch, s.sharded_spec, s.replicated_spec)
  return per_device(
      f, s, (weights, s.per_device_spec, s.per_device_spec, s.per_group_spec, s.per_group_spec),
      (s.per_group_spec, s.per_device_spec, s.per_device_spec))


def _head_fn(ws: WidthSetup, shape: StepShape, arch: Architecture, graphs: decoder.Graphs,
             rows: int):
  step = _step(ws, shape, arch)

  def f(table_state, norm_state, x_1xTxD, meta_1xL):
    logits_RxV = decoder.logits(graphs, table_state, norm_state, x_1xTxD[0],
                                unpack(meta_1xL[0], shape), step)
    return jnp.pad(logits_RxV, ((0, rows - shape.rows), (0, 0)))[None]
  s = ws.specs
  g = s.per_group_spec
  return per_device(f, s, (_vocab_spec(ws), s.replicated_spec, g, g), g)


def _sample_fn(ws: WidthSetup, hist: int, banned: int):
  def f(logits_1xRxV, sf_1xRxF, si_1xRxI):
    out = sample(logits_1xRxV[0], unpack_sampling(sf_1xRxF[0], si_1xRxI[0], hist, banned))
    return out.tokens[None], out.logprob[None], out.top_ids[None], out.top_logprobs[None]
  s = ws.specs
  g = s.per_group_spec
  return per_device(f, s, (g, g, g), (g, g, g, g))


class ProgramRegistry:
  """AOT-compiled programs for every allowed width and step shape of one engine."""

  def __init__(self, arch: Architecture, dtype, setups: dict[Span, WidthSetup], pool_struct,
               hist: int, banned: int, rows: int, local_layers: tuple[int, ...] = (),
               local_struct=None, attention: str = "xla"):
    """`local_layers`: a hybrid model's sliding layers, run by `layer_local` programs over
    their own pools (`local_struct`: one device's pool of one of them); `attention`: the
    paged-attention backend of the layer programs (`attention.attention_backend`)."""
    self.arch, self.dtype, self.setups = arch, jnp.dtype(dtype), setups
    self.rows = rows                    # sampled rows per group, every shape padded to it
    # pool_struct: one device's KV pool of one layer, [pages, slots, head_dim]
    self.pool_struct, self.hist, self.banned = pool_struct, hist, banned
    self.local_layers, self.local_struct = frozenset(local_layers), local_struct
    self.attention = attention
    self._layer_kinds = ("layer", "layer_local") if local_layers else ("layer",)
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
      yield ("sample", ws, None)
      for shape in ws.shapes:
        for kind in self._layer_kinds + ("head", "embed"):
          yield (kind, ws, shape)

  def build(self, weights_abstract: ResidentWeights, blocks, progress=None, threads: int = 2):
    """Lower and compile every program (a few at a time: XLA compiles off the GIL);
    `weights_abstract` and `blocks` (`heads.RowBlocks`): the resident weights' structs and
    row layout."""
    t0 = time.perf_counter()
    self.graphs = decoder.Graphs.of(decoder.abstract_model(self.arch, self.dtype, blocks))
    jobs = list(self._jobs())
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      futures = [pool.submit(self._compile, kind, ws, shape, weights_abstract)
                 for kind, ws, shape in jobs]
      for fut in concurrent.futures.as_completed(futures):
        fut.result()
        if progress is not None:
          progress.update(1)
    return time.perf_counter() - t0

  def count(self) -> int:
    per_shape = 2 + len(self._layer_kinds)
    return sum(1 + per_shape * len(ws.shapes) for ws in self.setups.values())

  def layer_kind(self, layer: int) -> str:
    """The program that runs decoder layer `layer`: `layer_local` for a hybrid model's sliding
    layers (their own pools and tables), `layer` for every other."""
    return "layer_local" if layer in self.local_layers else "layer"

  def _compile(self, kind: str, ws: WidthSetup, shape: StepShape | None, wa: ResidentWeights):
    s, g = ws.specs, ws.specs.groups
    rep = s.replicated()
    retarget = lambda x, to=rep: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=to)
    if kind == "sample":
      jitted = jax.jit(_sample_fn(ws, self.hist, self.banned))
      args = self.sample_structs(ws)
    else:
      meta = meta_struct(g, shape, s.per_group())
      x = jax.ShapeDtypeStruct((g, shape.tokens, self.arch.dim), self.dtype, sharding=s.per_group())
      one = self.local_struct if kind == "layer_local" else self.pool_struct
      pages, slots, hd = one.shape                       # one device's pool of one layer
      pool = jax.ShapeDtypeStruct((ws.span.devices * pages, slots, hd), one.dtype,
                                  sharding=s.per_device())
    sh = weight_shardings(wa, self.arch, s.sharded(), rep, ws.plan.reads.vocab)  # span's mesh
    on = lambda tree, shardings: jax.tree.map(retarget, tree, shardings)
    if kind == "embed":
      jitted = jax.jit(_embed_fn(ws, shape, self.arch, self.graphs))
      args = (on(wa.embed, sh.embed), meta)
    elif kind in ("layer", "layer_local"):
      lw = on(wa.layers[0], sh.layers[0])
      fn = _layer_fn(ws, shape, self.arch, self.graphs, lw, kind == "layer_local", self.attention)
      jitted = jax.jit(fn, donate_argnums=(1, 2, 3))
      args = (lw, pool, pool, x, meta)
    elif kind == "head":
      jitted = jax.jit(_head_fn(ws, shape, self.arch, self.graphs, self.rows))
      args = (on(wa.head_table, sh.head_table), on(wa.final_norm, sh.final_norm), x, meta)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    dt = time.perf_counter() - t0
    key = (ws.span, kind, shape)
    self._programs[key] = compiled
    mem = compiled.memory_analysis()
    self.stats.append(ProgramStats(
        key, dt, getattr(mem, "argument_size_in_bytes", 0), getattr(mem, "temp_size_in_bytes", 0),
        getattr(mem, "output_size_in_bytes", 0), getattr(mem, "alias_size_in_bytes", 0)))

  def sample_structs(self, ws: WidthSetup):
    g, r, sh = ws.specs.groups, self.rows, ws.specs.per_group()
    return (jax.ShapeDtypeStruct((g, r, self.arch.vocab_size), jnp.float32, sharding=sh),
            jax.ShapeDtypeStruct((g, r, SAMPLE_F32), jnp.float32, sharding=sh),
            jax.ShapeDtypeStruct((g, r, sample_i32_len(self.hist, self.banned)), jnp.int32,
                                 sharding=sh))


