"""The resident weight layout: one copy per engine, read by every width's program.

Projections are stored "x @ W" with the model dimension leading, query/key/value fused along a head
axis (`wqkv[D, Hq + 2*Hkv, hd]`) and gate/up fused (`w_gu[D, 2, F]`), so that width 1 runs plain GEMMs
on the resident arrays and a width-w program takes its heads / FFN columns out of them inside the
program (see `shard_layer`). Layers are separate arrays so no program slices a layer out of a stack.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flying_jax.config import Architecture
from flying_jax.model.heads import HeadPlan
from flying_jax.parallel import Collectives


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerWeights:
  attn_norm: jax.Array   # [D]
  wqkv: jax.Array        # [D, Hq + 2*Hkv, hd]
  wo: jax.Array          # [Hq, hd, D]
  ffn_norm: jax.Array    # [D]
  w_gu: jax.Array        # [D, 2, F]
  w_down: jax.Array      # [F, D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ResidentWeights:
  embed: jax.Array                  # [V, D]
  unembed: jax.Array | None         # [V, D]; None when tied to `embed`
  final_norm: jax.Array             # [D]
  layers: tuple[LayerWeights, ...]

  @property
  def logits_weight(self) -> jax.Array:
    return self.embed if self.unembed is None else self.unembed

  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self))

  def buffer_pointers(self) -> list[int]:
    """Device buffer addresses of every shard: unchanged as long as no weight byte moves."""
    return [s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(self) for s in x.addressable_shards]


def resident_layout(canonical: dict[str, np.ndarray], arch: Architecture, dtype) -> dict:
  """Canonical checkpoint arrays (see `flying_jax.checkpoints`) -> host arrays in resident layout."""
  dt = np.dtype(jnp.dtype(dtype))
  layers = []
  for l in range(arch.n_layers):
    wqkv = np.concatenate([canonical["wq"][l], canonical["wk"][l], canonical["wv"][l]], axis=1)
    w_gu = np.stack([canonical["w_gate"][l], canonical["w_up"][l]], axis=1)
    layers.append(dict(
        attn_norm=canonical["attn_norm"][l].astype(dt), wqkv=wqkv.astype(dt),
        wo=canonical["wo"][l].astype(dt), ffn_norm=canonical["ffn_norm"][l].astype(dt),
        w_gu=w_gu.astype(dt), w_down=canonical["w_down"][l].astype(dt)))
  unembed = None if arch.tied_embeddings else canonical["lm_head"].astype(dt)
  return dict(embed=canonical["embed"].astype(dt), unembed=unembed,
              final_norm=canonical["final_norm"].astype(dt), layers=layers)


def place(host: dict, sharding) -> ResidentWeights:
  """Put the weights on the devices once, replicated: each engine holds one full copy."""
  put = lambda a: None if a is None else jax.device_put(a, sharding)
  layers = tuple(LayerWeights(**{k: put(v) for k, v in lw.items()}) for lw in host["layers"])
  return ResidentWeights(embed=put(host["embed"]), unembed=put(host["unembed"]),
                         final_norm=put(host["final_norm"]), layers=layers)


def abstract(arch: Architecture, dtype, sharding) -> ResidentWeights:
  """ShapeDtypeStructs of the resident weights: AOT lowering and orbax restore targets."""
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  a = arch
  layer = LayerWeights(
      attn_norm=s(a.dim), wqkv=s(a.dim, a.n_heads + 2 * a.n_kv_heads, a.head_dim),
      wo=s(a.n_heads, a.head_dim, a.dim), ffn_norm=s(a.dim), w_gu=s(a.dim, 2, a.ffn_dim),
      w_down=s(a.ffn_dim, a.dim))
  return ResidentWeights(embed=s(a.vocab_size, a.dim),
                         unembed=None if a.tied_embeddings else s(a.vocab_size, a.dim),
                         final_norm=s(a.dim), layers=(layer,) * a.n_layers)


def shard_layer(lw: LayerWeights, plan: HeadPlan, coll: Collectives, arch: Architecture):
  """This device's slice of a resident layer, taken inside the program (nothing persistent)."""
  if plan.is_identity:
    return lw.wqkv, lw.wo, lw.w_gu, lw.w_down
  d = coll.index()
  hq, hkv = arch.n_heads, arch.n_kv_heads
  oob = hq + 2 * hkv                                    # out of range: filled with exact zeros
  q_idx = jnp.asarray(np.where(plan.q_index >= 0, plan.q_index, oob))[d]
  kv = plan.kv_index
  k_idx = jnp.asarray(np.where(kv >= 0, hq + kv, oob))[d]
  v_idx = jnp.asarray(np.where(kv >= 0, hq + hkv + kv, oob))[d]
  idx = jnp.concatenate([q_idx, k_idx, v_idx])
  wqkv = jnp.take(lw.wqkv, idx, axis=1, mode="fill", fill_value=0)
  wo = jnp.take(lw.wo, jnp.where(q_idx < hq, q_idx, hq), axis=0, mode="fill", fill_value=0)
  f = arch.ffn_dim // plan.width
  w_gu = jax.lax.dynamic_slice_in_dim(lw.w_gu, d * f, f, axis=2)
  w_down = jax.lax.dynamic_slice_in_dim(lw.w_down, d * f, f, axis=0)
  return wqkv, wo, w_gu, w_down
