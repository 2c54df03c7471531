"""The families as flax nnx modules: every parameter is where the weight table says (module path,
resident shape, logical axes), per-layer constants are the only other state, every layer of a
model shares one graph (so one compiled layer program serves them all), and a 70B model is made
abstractly without allocating, with the bytes the simulator counts."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from flying_jax.config import load_model_card
from flying_jax.model import tables
from flying_jax.model.decoder import Graphs, abstract_model, resident_state
from flying_jax.model.heads import row_blocks
from flying_jax.model.weights import CONSTANTS, at

BASE = dict(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=16, ffn_dim=192,
            vocab_size=512, rope_theta=1e4, norm_eps=1e-5, tied_embeddings=False,
            max_context=512)
FAMILIES = {
    "llama": {},
    "mistral": dict(sliding_window=8),
    "qwen3": {},
    "mixtral": dict(n_experts=4, experts_per_token=2),
    "gemma3": dict(tied_embeddings=True, sliding_window=8, sliding_pattern=3,
                   rope_local_theta=1e4, query_pre_attn_scalar=24),
}


def arch_of(family: str):
  from flying_jax.config import Architecture
  return Architecture(family=family, **{**BASE, **FAMILIES[family]})


def params(module) -> dict[str, nnx.Variable]:
  """Every variable of `module` by dotted path."""
  return {".".join(str(k) for k in path): v
          for path, v in nnx.to_flat_state(nnx.split(module)[1])}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("base", [1, 2])
def test_parameters_are_where_the_table_says(family, base):
  arch = arch_of(family)
  blocks = row_blocks(arch, (2, 4) if base == 2 else (1, 2, 4), base)
  model = abstract_model(arch, "bfloat16", blocks)
  layer = params(model.layers[0])
  want = {s.path for s in tables.layer_specs(arch)}
  consts = set(CONSTANTS.values()) if arch.sliding_window else set()
  assert set(layer) == want | consts
  top = {p: v for p, v in params(model).items() if not p.startswith("layers.")}
  assert set(top) == {s.path for s in tables.top_specs(arch)}
  for spec in tables.table(arch):
    v = (layer if spec.per_layer else top)[spec.path]
    assert isinstance(v, nnx.Param)
    assert v.shape == tables.resident_shape(spec, arch, blocks), spec.name
    assert v.get_metadata()["axes"] == spec.axes
    assert v.dtype == np.dtype("bfloat16")
  for path in consts:
    assert not isinstance(layer[path], nnx.Param)       # constants are not checkpoint tensors


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_layer_has_the_same_graph(family):
  arch = arch_of(family)
  model = abstract_model(arch, "float32", row_blocks(arch, (1, 2), 1))
  graphs = [nnx.split(layer)[0] for layer in model.layers]
  assert all(g == graphs[0] for g in graphs)
  Graphs.of(model)                                   # the parts programs merge
  assert (model.lm_head is None) == arch.tied_embeddings
  assert model.embed.scale == (np.sqrt(arch.dim) if family == "gemma3" else None)


def test_a_70b_model_is_made_abstractly_with_the_simulators_bytes():
  """Llama-3-70B on engines of two devices: no array allocated; the state's bytes are the
  simulator's (`tables.resident_bytes`), and a device holds half of every projection."""
  arch = load_model_card("llama-3-70b").arch
  blocks = row_blocks(arch, (2, 4, 8), 2)
  state = resident_state(abstract_model(arch, "bfloat16", blocks))
  leaves = jax.tree.leaves(state)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
  engine, device = tables.resident_bytes(arch, blocks, 2)
  assert total == engine and 70e9 < device * 2 < 150e9
  wq = at(state.layers, "attn.wq")                       # every layer's, stacked
  assert wq.shape == (arch.n_layers, arch.n_heads * arch.head_dim, arch.dim)
