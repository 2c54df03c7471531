"""Paged attention over one device's KV pool, blocked with an online softmax.

The pool of one layer on one device is `[pages, slots, hd]`; under a page interpretation with
`kv_per_device` heads a page holds `tokens_per_page = slots // kv_per_device` tokens, head-major,
so that both attention contractions are plain matrix products on what a page read returns: a V
page is `[heads, tokens, hd]` (slot `head * tokens_per_page + token`), a K page the same bytes read
as `[heads, hd, tokens]` (keys stored transposed). Attention walks a sequence's pages in blocks of
`pages_per_block` with a loop whose trip count is a run-time value, so one program serves every
context length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class KVGeometry:
  """Static page geometry of one width's programs (part of the program key)."""
  slots: int               # head-token slots per physical page (same for every width)
  kv_per_device: int
  pages_per_block: int
  max_pages: int           # page-table columns per sequence (multiple of pages_per_block)

  @property
  def tokens_per_page(self) -> int:
    return self.slots // self.kv_per_device


def write_kv(pool_PxSxH, new_TxKxH, base_T, tokens_per_page: int):
  """Store each token's heads at slots `base + head * tokens_per_page` (in place if donated).

  `base` is `page * slots + offset_in_page` (the host computes it; padding points at the null page).
  Indexed by (slot row, element): no flat address of the whole pool, which may pass 2^31 elements
  (every layer of a page space is one pool, `layers.Attention`).
  """
  p, s, h = pool_PxSxH.shape
  k = new_TxKxH.shape[1]
  addr_TxK = base_T[:, None] + tokens_per_page * jnp.arange(k, dtype=base_T.dtype)[None, :]
  flat = pool_PxSxH.reshape(p * s, h)
  flat = flat.at[addr_TxK.reshape(-1)].set(new_TxKxH.reshape(-1, h).astype(flat.dtype), mode="drop")
  return flat.reshape(p, s, h)


def write_k(pool_PxSxH, new_TxKxH, base_T, geom: KVGeometry):
  """Store keys transposed: element (head, d, token) of a page at `(head * hd + d) * T + token`
  of its `slots * hd` elements (indexed by (page, element), in place if donated)."""
  p, s, h = pool_PxSxH.shape
  k, t = new_TxKxH.shape[1], geom.tokens_per_page
  page_T, off_T = base_T // s, base_T % s
  col_KxH = (jnp.arange(k, dtype=base_T.dtype)[:, None] * h
             + jnp.arange(h, dtype=base_T.dtype)[None, :]) * t
  col_TxKxH = off_T[:, None, None] + col_KxH[None]
  page_TxKxH = jnp.broadcast_to(page_T[:, None, None], col_TxKxH.shape)
  flat = pool_PxSxH.reshape(p, s * h)
  flat = flat.at[page_TxKxH.reshape(-1), col_TxKxH.reshape(-1)].set(
      new_TxKxH.reshape(-1).astype(flat.dtype), mode="drop")
  return flat.reshape(p, s, h)


def _gather_keys(pool_PxSxH, pages_SxB, geom: KVGeometry):
  """The keys of `B` pages per sequence as [S, heads, hd, B * tokens_per_page]."""
  s, b = pages_SxB.shape
  k, t, hd = geom.kv_per_device, geom.tokens_per_page, pool_PxSxH.shape[-1]
  blk = pool_PxSxH[pages_SxB][:, :, :k * t].reshape(s, b, k, hd, t)
  if b > 1:
    blk = blk.transpose(0, 2, 3, 1, 4)
  return blk.reshape(s, k, hd, b * t)


def _gather_block(pool_PxSxH, pages_SxB, geom: KVGeometry):
  """The KV of `B` pages per sequence as [S, heads, B * tokens_per_page, hd]."""
  s, b = pages_SxB.shape
  k, t, hd = geom.kv_per_device, geom.tokens_per_page, pool_PxSxH.shape[-1]
  blk = pool_PxSxH[pages_SxB][:, :, :k * t]                     # [S, B, K*T, hd]
  blk = blk.reshape(s, b, k, t, hd)
  if b > 1:
    blk = blk.transpose(0, 2, 1, 3, 4)
  return blk.reshape(s, k, b * t, hd)


def paged_attention(q_SxQxKxGxH, qpos_SxQ, k_pool, v_pool, table_SxM, kvlen_S, n_blocks,
                    geom: KVGeometry, window=None, scale: float | None = None):
  """Causal attention of S sequences' Q query tokens over their paged KV.

  q: [S, Q, K kv heads, G queries per kv head, hd]; qpos: absolute positions of the queries;
  table: page ids per sequence (unused entries may be anything); kvlen: valid KV tokens per sequence;
  n_blocks: how many blocks of `pages_per_block` pages to visit (traced scalar).
  window: None, or a traced int32 W: a query at position i sees keys i-W+1 .. i (blocks wholly
  before every query's window are not visited). scale: of the scores (default hd ** -0.5).
  """
  s, q, k, g, hd = q_SxQxKxGxH.shape
  blk_tokens = geom.pages_per_block * geom.tokens_per_page
  scale = hd ** -0.5 if scale is None else scale
  # Rows r = (g, q) of each kv head: [S, K, G*Q, hd] (a free reshape when Q == 1).
  qf = (q_SxQxKxGxH.astype(jnp.float32) * scale).transpose(0, 2, 3, 1, 4).reshape(s, k, g * q, hd)
  qpos_SxR = jnp.broadcast_to(qpos_SxQ[:, None, :], (s, g, q)).reshape(s, g * q)

  def body(b, carry):
    m_SxKxR, l_SxKxR, acc = carry
    pages = jax.lax.dynamic_slice_in_dim(table_SxM, b * geom.pages_per_block,
                                         geom.pages_per_block, axis=1)
    kb = _gather_keys(k_pool, pages, geom).astype(jnp.float32)   # [S, K, hd, N]
    vb = _gather_block(v_pool, pages, geom).astype(jnp.float32)
    kv_pos = b * blk_tokens + jnp.arange(blk_tokens)
    mask_SxRxN = ((kv_pos[None, None, :] <= qpos_SxR[:, :, None])
                  & (kv_pos[None, None, :] < kvlen_S[:, None, None]))
    if window is not None:
      mask_SxRxN &= kv_pos[None, None, :] > qpos_SxR[:, :, None] - window
    mask = mask_SxRxN[:, None]                                      # [S, 1, R, N]
    sc = jnp.einsum("skrh,skhn->skrn", qf, kb)
    sc = jnp.where(mask, sc, _NEG)
    m_new = jnp.maximum(m_SxKxR, sc.max(-1))
    p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
    corr = jnp.exp(m_SxKxR - m_new)
    l_new = l_SxKxR * corr + p.sum(-1)
    acc = acc * corr[..., None] + jnp.einsum("skrn,sknh->skrh", p, vb)
    return m_new, l_new, acc

  init = (jnp.full((s, k, g * q), _NEG, jnp.float32), jnp.zeros((s, k, g * q), jnp.float32),
          jnp.zeros((s, k, g * q, hd), jnp.float32))
  first = 0
  if window is not None:                  # no query of the step sees keys before this block
    first = jnp.clip((qpos_SxQ.min() - window + 1) // blk_tokens, 0, n_blocks)
  with jax.named_scope("paged_attention"):
    _, l, acc = jax.lax.fori_loop(first, n_blocks, body, init)
  out = acc / jnp.maximum(l, 1e-30)[..., None]                     # [S, K, G*Q, hd]
  out = out.reshape(s, k, g, q, hd).transpose(0, 3, 1, 2, 4)       # [S, Q, K, G, hd]
  return out.astype(q_SxQxKxGxH.dtype)


BACKENDS = ("xla", "pallas")


def attention_backend(name: str, platform: str):
  """The paged-attention function programs call, by backend name: "xla" (`paged_attention`, the
  reference and the CPU path: a loop over blocks whose trip count is data) or "pallas" (one
  Pallas kernel on a static grid: `kernels.paged_tpu` (Mosaic) on a TPU, `kernels.paged_gpu`
  (Triton) on a GPU and in interpret mode on a CPU, where it is only a correctness check).
  Same signature and results."""
  if name == "xla":
    return paged_attention
  if name == "pallas":
    import functools

    if platform == "tpu":
      from flying_jax.model.kernels.paged_tpu import paged_attention_tpu
      return paged_attention_tpu
    from flying_jax.model.kernels.paged_gpu import paged_attention_pallas
    if platform not in ("gpu", "cuda", "rocm", "cpu"):
      raise ValueError(f"the pallas attention backend runs on TPUs and GPUs (and on CPUs in "
                       f"interpret mode), not on {platform!r}")
    return functools.partial(paged_attention_pallas, interpret=platform == "cpu")
  raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}")
