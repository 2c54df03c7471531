"""The Llama forward as pure per-device functions: embed, one decoder layer, final norm + logits.

Also Mistral (a sliding window through the layer's constants), Qwen3 (per-head q/k norms) and
Mixtral (a mixture of experts in place of the FFN, `moe.py`);
Gemma 3 (`gemma3.py`) reuses the attention block and the logits.

Each function sees one device's blocks (it runs under `per_device`); the width is static and only
decides which heads/columns the device takes and whether partial sums are reduced over the group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flying_jax.config import Architecture
from flying_jax.model.attention import KVGeometry, paged_attention, write_k, write_kv
from flying_jax.model.batch import StepMeta, StepShape
from flying_jax.model.heads import HeadPlan
from flying_jax.model.moe import moe_ffn
from flying_jax.model.weights import LayerWeights, shard_layer
from flying_jax.parallel import Collectives


def rms_norm(x_TxD, w_D, eps: float):
  xf = x_TxD.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * w_D.astype(jnp.float32)).astype(x_TxD.dtype)


def rope(x_TxNxH, pos_T, theta: float, inv_H=None):
  """Rotate-half rotary embedding (Hugging Face convention); `inv_H` (a layer's constants, see
  `weights.layer_constants`) replaces the inverse frequencies of base `theta`."""
  hd = x_TxNxH.shape[-1]
  inv = theta ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd) if inv_H is None else inv_H
  ang = pos_T.astype(jnp.float32)[:, None] * inv[None, :]         # [T, hd/2]
  cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]
  xf = x_TxNxH.astype(jnp.float32)
  x1, x2 = xf[..., : hd // 2], xf[..., hd // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_TxNxH.dtype)


def lookup(embed_VxD, tokens_T, coll: Collectives, vocab: int):
  """Embedding rows of `tokens`; a table split by vocabulary rows over an engine's devices
  (this device holds rows j*V/t ...) looks up what it holds and sums over the engine."""
  n = embed_VxD.shape[0]
  if n == vocab:
    return jnp.take(embed_VxD, tokens_T, axis=0)
  local = tokens_T - coll.shard_index() * n
  mine = (local >= 0) & (local < n)
  rows = jnp.take(embed_VxD, jnp.clip(local, 0, n - 1), axis=0)
  return coll.shard_sum(jnp.where(mine[:, None], rows, jnp.zeros_like(rows)))


def embed(embed_VxD, meta: StepMeta, *, coll: Collectives, arch: Architecture):
  with jax.named_scope("embed"):
    return lookup(embed_VxD, meta.tokens, coll, arch.vocab_size)


def _attention(q_TxQxH, k_pool, v_pool, meta: StepMeta, shape: StepShape, plan: HeadPlan,
               geom: KVGeometry, window=None, scale: float | None = None):
  t, _, hd = q_TxQxH.shape
  q = q_TxQxH.reshape(t, plan.kv_per_device, plan.q_per_kv, hd)
  d = shape.decode
  parts = []
  if d:
    parts.append(paged_attention(
        q[:d, None], meta.positions[:d, None], k_pool, v_pool, meta.dec_table, meta.dec_len,
        meta.n_blocks[0], geom, window, scale)[:, 0])
  if shape.chunk:
    r, c = shape.pre_rows, shape.chunk
    qp = q[d:].reshape(r, c, plan.kv_per_device, plan.q_per_kv, hd)
    parts.append(paged_attention(
        qp, meta.positions[d:].reshape(r, c), k_pool, v_pool, meta.pre_table, meta.pre_len,
        meta.n_blocks[1], geom, window, scale).reshape(r * c, plan.kv_per_device, plan.q_per_kv,
                                                       hd))
  out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
  return out.reshape(t, plan.q_per_device, hd)


def attention_block(lw: LayerWeights, k_pool, v_pool, h_TxD, meta: StepMeta, *, arch: Architecture,
                    shape: StepShape, plan: HeadPlan, geom: KVGeometry, coll: Collectives,
                    wq, wk, wv, wo):
  """Self-attention of the normed activations `h` on this device's heads (q/k norms and
  per-layer RoPE / window when the layer has them); returns this device's partial output
  (before the sum over the group) and the pools with the step's KV written."""
  nq, nkv, hd = plan.q_per_device, plan.kv_per_device, arch.head_dim
  heads = lambda w, n: (h_TxD @ w.T).reshape(h_TxD.shape[0], -1, hd)[:, :n]  # width 1: no padding
  q, k, v = heads(wq, nq), heads(wk, nkv), heads(wv, nkv)
  if lw.q_norm is not None:
    q, k = rms_norm(q, lw.q_norm, arch.norm_eps), rms_norm(k, lw.k_norm, arch.norm_eps)
  q = rope(q, meta.positions, arch.rope_theta, lw.rope_inv)
  k = rope(k, meta.positions, arch.rope_theta, lw.rope_inv)
  k_pool = write_k(k_pool, k, meta.write_base, geom)
  v_pool = write_kv(v_pool, v, meta.write_base, geom.tokens_per_page)
  window = None if lw.window is None else lw.window[0]
  o = _attention(q, k_pool, v_pool, meta, shape, plan, geom, window, arch.attn_scale)
  mask = plan.q_mask
  if mask is not None:                       # a neighbour's head read by an uneven split
    o = o * jnp.asarray(mask, o.dtype)[coll.index()][None, :, None]
  o = o.reshape(o.shape[0], nq * hd)
  if wo.shape[0] > nq * hd:
    o = jnp.pad(o, ((0, 0), (0, wo.shape[0] - nq * hd)))
  return o @ wo, k_pool, v_pool


def layer(lw: LayerWeights, k_pool, v_pool, x_TxD, meta: StepMeta, *, arch: Architecture,
          shape: StepShape, plan: HeadPlan, geom: KVGeometry, coll: Collectives):
  """One decoder layer on this device; writes the step's KV into the pools and returns them."""
  wq, wk, wv, wo, w_gate, w_up, w_down = shard_layer(lw, plan, coll, arch)
  with jax.named_scope("attention"):
    h = rms_norm(x_TxD, lw.attn_norm, arch.norm_eps)
    o, k_pool, v_pool = attention_block(lw, k_pool, v_pool, h, meta, arch=arch, shape=shape,
                                        plan=plan, geom=geom, coll=coll, wq=wq, wk=wk, wv=wv,
                                        wo=wo)
    x_TxD = x_TxD + coll.sum(o)
  with jax.named_scope("ffn"):
    h = rms_norm(x_TxD, lw.ffn_norm, arch.norm_eps)
    if lw.w_router is not None:                        # Mixtral: a mixture of experts
      return x_TxD + moe_ffn(h, lw.w_router, w_gate, w_up, w_down, top_k=arch.experts_per_token,
                             coll=coll), k_pool, v_pool
    g = (h @ w_gate.T).astype(jnp.float32)
    u = (h @ w_up.T).astype(jnp.float32)
    a = (jax.nn.silu(g) * u).astype(x_TxD.dtype)
    x_TxD = x_TxD + coll.sum(a @ w_down)
  return x_TxD, k_pool, v_pool


def logits(unembed_VxD, final_norm_D, x_TxD, meta: StepMeta, *, arch: Architecture,
           coll: Collectives):
  """Float32 logits of the sampled rows; each device computes a vocabulary slice, then gathers."""
  with jax.named_scope("logits"):
    h = rms_norm(jnp.take(x_TxD, meta.rows, axis=0), final_norm_D, arch.norm_eps)
    v, held = arch.vocab_size, unembed_VxD.shape[0]  # held < v: split over the engine (V/t)
    if coll.width > 1 and v % coll.width == 0:
      part, merged = v // coll.width, coll.width * held // v   # engines merged into the group
      start = (coll.index() % merged) * part                  # rank j*m+e: sub-block e of j
      w = jax.lax.dynamic_slice_in_dim(unembed_VxD, start, part, axis=0)
      return coll.gather(jnp.einsum("rd,vd->rv", h, w, preferred_element_type=jnp.float32), 1)
    return jnp.einsum("rd,vd->rv", h, unembed_VxD, preferred_element_type=jnp.float32)
