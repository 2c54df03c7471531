"""Shared flax nnx layers of every family: RMSNorm, embeddings (lookup and logits), grouped-query
attention over the paged KV pool with rotary embeddings, gated MLPs.

Parameters are created from the family's weight table (`model.tables`): each has the resident
shape and dtype of its tensor and carries its logical axes (`axes` metadata). A layer's `__call__`
runs on ONE device (programs run it under `per_device`) and takes a `Step`, the static facts of
the program it is traced into: the width decides which rows of its shard a device reads
(`weights.shard_rows`) and whether partial sums are reduced over the group. Modules hold
parameters only; they are split once (`nnx.split`) and merged inside each compiled program, so
programs stay pure functions of arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flying_jax.config import Architecture
from flying_jax.model import tables
from flying_jax.model.attention import KVGeometry, attention_backend, write_k, write_kv
from flying_jax.model.batch import StepMeta, StepShape
from flying_jax.model.heads import HeadPlan
from flying_jax.model.weights import shard_rows
from flying_jax.parallel import Collectives


class Constant(nnx.Variable):
  """A per-layer constant that is not in checkpoints (RoPE frequencies, a window), as an array
  so one compiled layer program serves layers that differ in it (`weights.layer_constants`)."""


@dataclasses.dataclass(frozen=True)
class Step:
  """What a program is compiled for: the model, the step's shape, the width's head plan and KV
  geometry, and the group's collectives; `local`: the layer reads a hybrid model's sliding-layer
  page space (its own pools, tables and write slots: `StepMeta.local_view`)."""
  arch: Architecture
  shape: StepShape
  plan: HeadPlan
  geom: KVGeometry
  coll: Collectives
  local: bool = False
  attention: str = "xla"         # the paged-attention backend (`attention.attention_backend`)
  platform: str = "cpu"


@dataclasses.dataclass(frozen=True)
class Init:
  """How parameters are made: the model, its resident row layout (`heads.RowBlocks`), dtype."""
  arch: Architecture
  blocks: object
  dtype: object

  def param(self, name: str) -> nnx.Param:
    """The parameter of table tensor `name`, zeros of its resident shape (made abstractly under
    `nnx.eval_shape`; the loader fills it)."""
    spec = tables.spec_of(self.arch, name)
    shape = tables.resident_shape(spec, self.arch, self.blocks)
    return nnx.Param(jnp.zeros(shape, self.dtype), axes=spec.axes)

  def has(self, name: str) -> bool:
    return any(s.name == name for s in tables.table(self.arch))


def rms_norm(x_TxD, w_D, eps: float):
  xf = x_TxD.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * w_D.astype(jnp.float32)).astype(x_TxD.dtype)


def rope(x_TxNxH, pos_T, theta: float, inv_H=None):
  """Rotate-half rotary embedding (Hugging Face convention); `inv_H` (a layer's constants)
  replaces the inverse frequencies of base `theta`."""
  hd = x_TxNxH.shape[-1]
  inv = theta ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd) if inv_H is None else inv_H
  ang = pos_T.astype(jnp.float32)[:, None] * inv[None, :]         # [T, hd/2]
  cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]
  xf = x_TxNxH.astype(jnp.float32)
  x1, x2 = xf[..., : hd // 2], xf[..., hd // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_TxNxH.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, init: Init, name: str):
    self.scale = init.param(name)
    self.eps = init.arch.norm_eps

  def __call__(self, x):
    return rms_norm(x, self.scale[...], self.eps)


class Embedding(nnx.Module):
  """A [V, D] table (or an engine device's block of its rows): token lookup and logits.
  `scale` multiplies looked-up rows (Gemma: sqrt(dim), in float32)."""

  def __init__(self, init: Init, name: str, scale: float | None = None):
    self.table = init.param(name)
    self.scale = scale

  def __call__(self, tokens_T, step: Step):
    """Rows of `tokens`; a table split by vocabulary rows over an engine's devices (this device
    holds rows j*V/t ...) looks up what it holds and sums over the engine."""
    table, coll, vocab = self.table[...], step.coll, step.arch.vocab_size
    n = table.shape[0]
    if n == vocab:
      x = jnp.take(table, tokens_T, axis=0)
    else:
      local = tokens_T - coll.shard_index() * n
      mine = (local >= 0) & (local < n)
      rows = jnp.take(table, jnp.clip(local, 0, n - 1), axis=0)
      x = coll.shard_sum(jnp.where(mine[:, None], rows, jnp.zeros_like(rows)))
    if self.scale is not None:
      x = (x.astype(jnp.float32) * self.scale).astype(x.dtype)
    return x

  def logits(self, h_RxD, step: Step):
    """Float32 logits; each device computes a vocabulary slice, then the group gathers."""
    table, coll = self.table[...], step.coll
    v, held = step.arch.vocab_size, table.shape[0]  # held < v: split over the engine (V/t)
    if coll.width > 1 and v % coll.width == 0:
      part, merged = v // coll.width, coll.width * held // v   # engines merged into the group
      start = (coll.index() % merged) * part                  # rank j*m+e: sub-block e of j
      w = jax.lax.dynamic_slice_in_dim(table, start, part, axis=0)
      return coll.gather(jnp.einsum("rd,vd->rv", h_RxD, w, preferred_element_type=jnp.float32), 1)
    return jnp.einsum("rd,vd->rv", h_RxD, table, preferred_element_type=jnp.float32)


def _attend(q_TxQxH, k_pool, v_pool, meta: StepMeta, step: Step, window, scale):
  """Paged attention of the step's decode rows, then its prefill chunks."""
  shape, plan, geom = step.shape, step.plan, step.geom
  t, _, hd = q_TxQxH.shape
  q = q_TxQxH.reshape(t, plan.kv_per_device, plan.q_per_kv, hd)
  d = shape.decode
  attend = attention_backend(step.attention, step.platform)
  parts = []
  if d:
    parts.append(attend(
        q[:d, None], meta.positions[:d, None], k_pool, v_pool, meta.dec_table, meta.dec_len,
        meta.n_blocks[0], geom, window, scale)[:, 0])
  if shape.chunk:
    r, c = shape.pre_rows, shape.chunk
    qp = q[d:].reshape(r, c, plan.kv_per_device, plan.q_per_kv, hd)
    parts.append(attend(
        qp, meta.positions[d:].reshape(r, c), k_pool, v_pool, meta.pre_table, meta.pre_len,
        meta.n_blocks[1], geom, window, scale).reshape(r * c, plan.kv_per_device, plan.q_per_kv,
                                                       hd))
  out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
  return out.reshape(t, plan.q_per_device, hd)


class Attention(nnx.Module):
  """Grouped-query self-attention over the paged pool on this device's heads, with per-head q/k
  norms (Qwen3, Gemma 3) and per-layer RoPE base / sliding window when the family has them."""

  def __init__(self, init: Init):
    self.wq, self.wk, self.wv, self.wo = (init.param(n) for n in ("wq", "wk", "wv", "wo"))
    self.q_norm = RMSNorm(init, "q_norm") if init.has("q_norm") else None
    self.k_norm = RMSNorm(init, "k_norm") if init.has("k_norm") else None
    a = init.arch
    if a.sliding_window:                         # values: `weights.layer_constants`
      self.rope_inv = Constant(jnp.zeros((a.head_dim // 2,), jnp.float32))
      self.window = Constant(jnp.zeros((1,), jnp.int32))
    else:
      self.rope_inv = self.window = None

  def __call__(self, h_TxD, k_pool, v_pool, layer, meta: StepMeta, step: Step):
    """This device's partial output (before the sum over the group) and the pools with the
    step's KV written. `k_pool`, `v_pool`: this device's stacked pools of the layer's page space
    `[layers, pages, slots, hd]` (`step.local`: the sliding layers' own space, tables and
    slots), of which this layer is entry `layer` (traced): they are read as one pool of
    `layers * pages` pages, the layer's own from `layer * pages` on."""
    arch, plan, coll = step.arch, step.plan, step.coll
    if step.local:
      meta = meta.local_view()
    stack = k_pool.shape
    n, pages, slots, _ = stack
    meta = meta.at_layer(layer * pages, slots)
    k_pool, v_pool = k_pool.reshape(n * pages, *stack[2:]), v_pool.reshape(n * pages, *stack[2:])
    nq, nkv, hd = plan.q_per_device, plan.kv_per_device, arch.head_dim
    rows = lambda w, kind: shard_rows(w[...], kind, plan, coll, hd)
    wq, wk, wv, wo = rows(self.wq, "q"), rows(self.wk, "kv"), rows(self.wv, "kv"), rows(self.wo, "q")
    heads = lambda w, n: (h_TxD @ w.T).reshape(h_TxD.shape[0], -1, hd)[:, :n]  # width 1: no pad
    q, k, v = heads(wq, nq), heads(wk, nkv), heads(wv, nkv)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    inv = None if self.rope_inv is None else self.rope_inv[...]
    q = rope(q, meta.positions, arch.rope_theta, inv)
    k = rope(k, meta.positions, arch.rope_theta, inv)
    k_pool = write_k(k_pool, k, meta.write_base, step.geom)
    v_pool = write_kv(v_pool, v, meta.write_base, step.geom.tokens_per_page)
    window = None if self.window is None else self.window[...][0]
    o = _attend(q, k_pool, v_pool, meta, step, window, arch.attn_scale)
    mask = plan.q_mask
    if mask is not None:                       # a neighbour's head read by an uneven split
      o = o * jnp.asarray(mask, o.dtype)[coll.index()][None, :, None]
    o = o.reshape(o.shape[0], nq * hd)
    if wo.shape[0] > nq * hd:
      o = jnp.pad(o, ((0, 0), (0, wo.shape[0] - nq * hd)))
    return o @ wo, k_pool.reshape(stack), v_pool.reshape(stack)


class GatedMLP(nnx.Module):
  """act(h W_gate^T) * (h W_up^T) W_down on this device's FFN columns: SwiGLU ("silu") or GeGLU
  with the tanh approximation ("gelu_tanh"); returns this device's partial output."""

  def __init__(self, init: Init, activation: str):
    self.w_gate, self.w_up, self.w_down = (init.param(n) for n in ("w_gate", "w_up", "w_down"))
    self.activation = activation

  def __call__(self, h_TxD, step: Step):
    rows = lambda w: shard_rows(w[...], "ffn", step.plan, step.coll, step.arch.head_dim)
    g = (h_TxD @ rows(self.w_gate).T).astype(jnp.float32)
    u = (h_TxD @ rows(self.w_up).T).astype(jnp.float32)
    act = jax.nn.silu(g) if self.activation == "silu" else jax.nn.gelu(g, approximate=True)
    return (act * u).astype(h_TxD.dtype) @ rows(self.w_down)
