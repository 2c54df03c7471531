"""The Gemma 3 forward as pure per-device functions (the text decoder of Gemma 3).

Differences from Llama (`llama.py`, whose attention block and logits it reuses):
- embeddings are multiplied by sqrt(dim) (in float32, then cast);
- per-head RMSNorms on q and k before RoPE;
- "sandwich" norms: the attention output and the FFN output are RMS-normed (after the sum over
  the group: a norm of a partial sum would be wrong) before they join the residual;
- GeGLU with the tanh approximation of GELU;
- five of every six layers attend to a sliding window with their own RoPE base, read from the
  layer's constants (`weights.layer_constants`) so one compiled program serves both kinds;
- scores scale by `query_pre_attn_scalar ** -0.5`.
GGUF norm weights include Gemma's `1 +`; Hugging Face ones are read plus one (`model.tables`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from flying_jax.config import Architecture
from flying_jax.model.attention import KVGeometry
from flying_jax.model.batch import StepMeta, StepShape
from flying_jax.model.heads import HeadPlan
from flying_jax.model.llama import attention_block, logits, lookup, rms_norm
from flying_jax.model.weights import LayerWeights, shard_layer
from flying_jax.parallel import Collectives

__all__ = ["embed", "layer", "logits"]


def embed(embed_VxD, meta: StepMeta, *, coll: Collectives, arch: Architecture):
  with jax.named_scope("embed"):
    x = lookup(embed_VxD, meta.tokens, coll, arch.vocab_size)
    return (x.astype(jnp.float32) * math.sqrt(arch.dim)).astype(x.dtype)


def layer(lw: LayerWeights, k_pool, v_pool, x_TxD, meta: StepMeta, *, arch: Architecture,
          shape: StepShape, plan: HeadPlan, geom: KVGeometry, coll: Collectives):
  """One Gemma 3 decoder layer on this device; writes the step's KV into the pools."""
  wq, wk, wv, wo, w_gate, w_up, w_down = shard_layer(lw, plan, coll, arch)
  eps = arch.norm_eps
  with jax.named_scope("attention"):
    h = rms_norm(x_TxD, lw.attn_norm, eps)
    o, k_pool, v_pool = attention_block(lw, k_pool, v_pool, h, meta, arch=arch, shape=shape,
                                        plan=plan, geom=geom, coll=coll, wq=wq, wk=wk, wv=wv,
                                        wo=wo)
    x_TxD = x_TxD + rms_norm(coll.sum(o), lw.post_attn_norm, eps)
  with jax.named_scope("ffn"):
    h = rms_norm(x_TxD, lw.ffn_norm, eps)
    g = (h @ w_gate.T).astype(jnp.float32)
    u = (h @ w_up.T).astype(jnp.float32)
    a = (jax.nn.gelu(g, approximate=True) * u).astype(x_TxD.dtype)
    x_TxD = x_TxD + rms_norm(coll.sum(a @ w_down), lw.post_ffn_norm, eps)
  return x_TxD, k_pool, v_pool
