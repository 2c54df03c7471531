"""A family's model as one flax nnx module, split once into graphs and a resident state.

`Decoder` holds the token embeddings, the family's decoder layers (`Layer` of the family's
forward module), the final norm and, when not tied, the output table. It is only ever made
abstractly (`abstract_model`, under `nnx.eval_shape`): the loader fills its state
(`weights.ResidentWeights`, plain dicts by module path) straight onto the devices, and `Graphs`
keeps the graph definitions of its parts. Each compiled program merges its part's graph with
the arrays it is given (`embed`, `layer`, `logits` below), so programs are pure functions of
(state, KV pools, step metadata). Every layer of a model has the same graph (per-layer RoPE
bases and windows are arrays, `layers.Constant`), so one compiled layer program serves them all.
"""

from __future__ import annotations

import dataclasses
import math

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
  """The model's state as the engine keeps it: plain dicts by module path."""
  state = nnx.to_pure_dict(nnx.split(model)[1])
  layers = state["layers"]
  return ResidentWeights(embed=state["embed"], lm_head=state.get("lm_head"),
                         final_norm=state["final_norm"],
                         layers=tuple(layers[i] for i in range(len(layers))))


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


def layer(graphs: Graphs, layer_state: dict, k_pool, v_pool, x_TxD, meta: StepMeta, step: Step):
  """One decoder layer; returns (activations, k_pool, v_pool)."""
  return nnx.merge(graphs.layer, layer_state)(k_pool, v_pool, x_TxD, meta, step)


def logits(graphs: Graphs, table_state: dict, norm_state: dict, x_TxD, meta: StepMeta,
           step: Step):
  """Float32 logits [R, V] of the sampled rows (`meta.rows`)."""
  h = nnx.merge(graphs.final_norm, norm_state)(jnp.take(x_TxD, meta.rows, axis=0))
  return nnx.merge(graphs.head_table, table_state).logits(h, step)
