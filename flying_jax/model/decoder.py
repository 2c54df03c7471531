"""A family's model as one flax nnx module, split once into graphs and a resident state.

`Decoder` holds the token embeddings, the family's decoder layers (`Layer` of the family's
forward module), the final norm and, when not tied, the output table. It is only ever made
abstractly (`abstract_model`, under `nnx.eval_shape`): the loader fills its state
(`weights.ResidentWeights`, plain dicts by module path) straight onto the devices, and `Graphs`
keeps the graph definitions of its parts. Each compiled program merges its part's graph with
the arrays it is given (`embed`, `layers`, `logits` below), so programs are pure functions of
(state, KV pools, step metadata). Every layer of a model has the same graph (per-layer RoPE
bases and windows are arrays, `layers.Constant`), so the layers' states are stacked on a
leading axis and one loop body, traced once, walks them all (`layers`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from flying_jax.config import Architecture
from flying_jax.model.batch import StepMeta
from flying_jax.model.families import family_of
from flying_jax.model.layers import Embedding, Init, RMSNorm, Step
from flying_jax.model.weights import ResidentWeights


class Decoder(nnx.Module):
  def __init__(self, init: Init):
    arch, forward = init.arch, family_of(init.arch.family).forward
    self.embed = Embedding(init, "embed", math.sqrt(arch.dim) if forward.EMBED_SCALE else None)
    self.layers = nnx.List([forward.Layer(init) for _ in range(arch.n_layers)])
    self.final_norm = RMSNorm(init, "final_norm")
    self.lm_head = None if arch.tied_embeddings else Embedding(init, "lm_head")


def abstract_model(arch: Architecture, dtype, blocks) -> Decoder:
  """The model with ShapeDtypeStructs for arrays, laid out in `blocks` (`heads.RowBlocks`)."""
  return nnx.eval_shape(lambda: Decoder(Init(arch, blocks, jnp.dtype(dtype))))


def resident_state(model: Decoder) -> ResidentWeights:
  """The model's state as the engine keeps it: plain dicts by module path, the layers' stacked
  on a leading axis (`weights.ResidentWeights`)."""
  from flying_jax.model.weights import stack_layers

  state = nnx.to_pure_dict(nnx.split(model)[1])
  layers = [state["layers"][i] for i in range(len(state["layers"]))]
  return ResidentWeights(embed=state["embed"], lm_head=state.get("lm_head"),
                         final_norm=state["final_norm"],
                         layers=jax.tree.map(lambda *xs: stack_layers(list(xs)), *layers))


@dataclasses.dataclass(frozen=True)
class Graphs:
  """The graph definitions of a model's parts, each merged inside the programs that run it."""
  embed: nnx.GraphDef
  layer: nnx.GraphDef
  final_norm: nnx.GraphDef
  head_table: nnx.GraphDef          # the output table (the embeddings' when tied)

  @classmethod
  def of(cls, model: Decoder) -> "Graphs":
    graph = lambda m: nnx.split(m)[0]
    table = model.embed if model.lm_head is None else model.lm_head
    return cls(graph(model.embed), graph(model.layers[0]), graph(model.final_norm), graph(table))


def embed(graphs: Graphs, embed_state: dict, meta: StepMeta, step: Step):
  """Token ids -> activations [T, D]."""
  return nnx.merge(graphs.embed, embed_state)(meta.tokens, step)


@dataclasses.dataclass(frozen=True)
class LayerWalk:
  """How a program walks a model's layers: the page space each layer's KV lives in (0, or 1 for
  a hybrid model's sliding layers, `kv.window`), each space's pools stacked in layer order.

  The loop body runs one `period` of layers, the shortest run whose spaces repeat through the
  model (1 for most models; 6 for Gemma 3: five sliding layers and a global one), so each layer
  of the body knows its space statically; a tail shorter than a period runs after the loop."""
  spaces: tuple[int, ...]

  @property
  def period(self) -> int:
    n = len(self.spaces)
    return next(p for p in range(1, n + 1)
                if all(self.spaces[l] == self.spaces[l % p] for l in range(n)))

  def index(self, j, i: int):
    """(layer, entry in its space's stack) of position `i` of period `j` (traced or not)."""
    p, pattern = self.period, self.spaces[:self.period]
    space = pattern[i]
    return j * p + i, j * pattern.count(space) + pattern[:i].count(space)


def layers(graphs: Graphs, layer_state: dict, k_pools: tuple, v_pools: tuple, x_TxD,
           meta: StepMeta, steps: tuple, walk: LayerWalk):
  """Every decoder layer, in a loop of static trip count over periods of layers (no host
  round trip, one layer's compile). `layer_state`: stacked on a leading layer axis; `k_pools`,
  `v_pools`: per page space, stacked `[layers, pages, slots, hd]`; `steps`: the `Step` of each
  page space. Returns (activations, k_pools, v_pools)."""
  period = walk.period

  def run(j, i, carry):
    x, ks, vs = carry
    l, at = walk.index(j, i)
    space = walk.spaces[i]
    state = jax.tree.map(lambda a: a[l], layer_state)
    ks, vs = list(ks), list(vs)
    x, ks[space], vs[space] = nnx.merge(graphs.layer, state)(ks[space], vs[space], at, x, meta,
                                                             steps[space])
    return x, tuple(ks), tuple(vs)

  def body(j, carry):
    for i in range(period):
      carry = run(j, i, carry)
    return carry

  full, tail = divmod(len(walk.spaces), period)
  carry = (x_TxD, tuple(k_pools), tuple(v_pools))
  if full:
    carry = jax.lax.fori_loop(0, full, body, carry)
  for i in range(tail):
    carry = run(full, i, carry)
  return carry


def logits(graphs: Graphs, table_state: dict, norm_state: dict, x_TxD, meta: StepMeta,
           step: Step):
  """Float32 logits [R, V] of the sampled rows (`meta.rows`)."""
  h = nnx.merge(graphs.final_norm, norm_state)(jnp.take(x_TxD, meta.rows, axis=0))
  return nnx.merge(graphs.head_table, table_state).logits(h, step)
