"""Paged attention over one device's KV pool, blocked with an online softmax.

The pool of one layer on one device is `[pages, slots, hd]`; under a page interpretation with
`kv_per_device` heads a page holds `tokens_per_page = slots // kv_per_device` tokens, slot
`token * kv_per_device + head`. Attention walks a sequence's pages in blocks of `pages_per_block`
with a loop whose trip count is a run-time value, so one program serves every context length.
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


def write_kv(pool_PxSxH, new_TxKxH, base_T):
  """Store the new tokens' heads at slots `base + head` of the flattened pool (in place if donated)."""
  p, s, h = pool_PxSxH.shape
  k = new_TxKxH.shape[1]
  addr_TxK = base_T[:, None] + jnp.arange(k, dtype=base_T.dtype)[None, :]
  flat = pool_PxSxH.reshape(p * s, h)
  flat = flat.at[addr_TxK.reshape(-1)].set(new_TxKxH.reshape(-1, h).astype(flat.dtype), mode="drop")
  return flat.reshape(p, s, h)


def _gather_block(pool_PxSxH, pages_SxB, geom: KVGeometry):
  blk = pool_PxSxH[pages_SxB]                                   # [S, B, slots, hd]
  s, b = pages_SxB.shape
  used = geom.tokens_per_page * geom.kv_per_device
  blk = blk[:, :, :used]
  return blk.reshape(s, b * geom.tokens_per_page, geom.kv_per_device, pool_PxSxH.shape[-1])


def paged_attention(q_SxQxKxGxH, qpos_SxQ, k_pool, v_pool, table_SxM, kvlen_S, n_blocks,
                    geom: KVGeometry):
  """Causal attention of S sequences' Q query tokens over their paged KV.

  q: [S, Q, K kv heads, G queries per kv head, hd]; qpos: absolute positions of the queries;
  table: page ids per sequence (unused entries may be anything); kvlen: valid KV tokens per sequence;
  n_blocks: how many blocks of `pages_per_block` pages to visit (traced scalar).
  """
  s, q, k, g, hd = q_SxQxKxGxH.shape
  blk_tokens = geom.pages_per_block * geom.tokens_per_page
  scale = hd ** -0.5
  qf = q_SxQxKxGxH.astype(jnp.float32) * scale

  def body(b, carry):
    m_SxKxGxQ, l_SxKxGxQ, acc = carry
    pages = jax.lax.dynamic_slice_in_dim(table_SxM, b * geom.pages_per_block,
                                         geom.pages_per_block, axis=1)
    kb = _gather_block(k_pool, pages, geom).astype(jnp.float32)  # [S, N, K, hd]
    vb = _gather_block(v_pool, pages, geom).astype(jnp.float32)
    kv_pos = b * blk_tokens + jnp.arange(blk_tokens)
    mask_SxQxN = ((kv_pos[None, None, :] <= qpos_SxQ[:, :, None])
                  & (kv_pos[None, None, :] < kvlen_S[:, None, None]))
    mask = mask_SxQxN[:, None, None]                               # [S, 1, 1, Q, N]
    sc = jnp.einsum("sqkgh,snkh->skgqn", qf, kb)
    sc = jnp.where(mask, sc, _NEG)
    m_new = jnp.maximum(m_SxKxGxQ, sc.max(-1))
    p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
    corr = jnp.exp(m_SxKxGxQ - m_new)
    l_new = l_SxKxGxQ * corr + p.sum(-1)
    acc = acc * corr[..., None] + jnp.einsum("skgqn,snkh->skgqh", p, vb)
    return m_new, l_new, acc

  init = (jnp.full((s, k, g, q), _NEG, jnp.float32), jnp.zeros((s, k, g, q), jnp.float32),
          jnp.zeros((s, k, g, q, hd), jnp.float32))
  with jax.named_scope("paged_attention"):
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
  out = acc / jnp.maximum(l, 1e-30)[..., None]                     # [S, K, G, Q, hd]
  return out.transpose(0, 3, 1, 2, 4).astype(q_SxQxKxGxH.dtype)   # [S, Q, K, G, hd]
