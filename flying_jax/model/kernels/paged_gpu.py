"""Paged attention as one Pallas (Triton) kernel over flying-jax's own KV page layout, for GPUs.

Same signature and semantics as `flying_jax.model.attention.paged_attention` (the reference),
without its XLA while loop: that loop's trip count is a run-time value, so on a GPU every block
it visits costs a return to the host. Here the grid is static and everything that depends on the
step (lengths, page ids, positions, the window, `n_blocks`) is data the kernel reads.

Layout read in place. The pool of one layer on one device is `[pages, slots, hd]`; under the
width's page interpretation (`KVGeometry`) a page holds `T = slots // kv_per_device` tokens per
head, the first `kv_per_device * T` slots used: V element (head, token, d) at flat offset
`(head * T + token) * hd + d` of the page's `slots * hd` elements, K element (head, d, token) at
`(head * hd + d) * T + token` (keys stored transposed). The kernel sees each pool as the free
reshape `[pages, slots * hd]` and gathers tiles with computed offsets, so any interpretation of
the same bytes (any `kv_per_device` for one `slots`, `T` not a power of two included) is read
without a copy.

Grid `(S, K, row blocks, splits)` (flash-decoding):
* rows: the `Q * G` queries of one kv head, row `r = q * G + g`, padded to `block_rows` (a block
  holds consecutive query positions, so causal and window bounds are tight per block);
* splits: the KV tokens one row block needs, `[lo, hi)` with `hi = min(kvlen, n_blocks *
  pages_per_block * T, max position of the block + 1)` and `lo` the window's start for the
  block's earliest query (0 without a window), are cut into compute blocks of
  `pages_per_compute_block` pages; the run-time count of compute blocks is shared evenly among
  the splits, and each program walks its share with a loop inside the kernel (Triton `scf.for`),
  reading the page ids of a compute block from the table row, loading the K tile `[hd, N]` and
  the V tile `[N, hd]` with one gather each, and updating an online softmax in float32 (operands
  in the pool's dtype, float32 accumulation).
* each program writes its unnormalised output with its running max and sum; a few XLA element-wise
  ops outside the kernel merge the splits (rescale by `exp(m_split - m_max)`, add, divide). A row
  that sees no key (kvlen 0, padding) gives 0, as the reference does.

Shapes for real Triton (handled here by padding; in interpret mode anything works): every tensor a
kernel loads or stores must have a power-of-two size, and `tl.dot` wants every dimension at least
16. So rows are padded to `block_rows` (a power of two >= 16 when compiled, checked; default the
smallest covering `Q * G`, at most 64), the token axis of a compute block to
`N = next_pow2(max(16, pages_per_compute_block * T))` (the extra columns are masked; with `T` not a
power of two pick `pages_per_compute_block` so that `pages * T` is just under one), and `hd` to a
power of two >= 16 (extra K rows re-read the last d and meet zero query columns, extra V columns
are dropped). Register and shared-memory use grow with `block_rows * hd` (accumulator) and `N * hd`
(tiles): the defaults (at most 64 rows, about 64 tokens) are a guess not yet timed on a GPU; with
hd=256 smaller tiles or more warps may be needed. Decode with G < 16 wastes the padded rows of the
first dot (the kernel is memory-bound there). Offsets into a pool above 4 GiB are 64-bit (Pallas
does that from the array's size). Table entries past a sequence's keys may be anything: those
columns read page 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flying_jax.model.attention import KVGeometry
from flying_jax.model.kernels.common import check_arguments

_NEG = -1e30          # the reference's mask value: exp(_NEG - m) is 0, _NEG - _NEG is 0
_MIN_DOT = 16         # smallest dot dimension Triton accepts


def _pow2(n: int, lo: int = _MIN_DOT) -> int:
  p = lo
  while p < n:
    p *= 2
  return p


def _cdiv(a, b: int):
  b = jnp.int32(b)
  return lax.div(a + b - 1, b)


def _kernel(info_ref, table_ref, qpos_ref, q_ref, k_ref, v_ref,   # inputs
            o_ref, l_ref, m_ref,                                    # outputs
            *, tokens: int, hd: int, pages_per_cb: int, cols: int, splits: int, scale: float,
            has_window: bool, pool_pages: int, max_pages: int):
  """One (sequence, kv head, row block, split): its share of the compute blocks."""
  h = pl.program_id(1)
  j = pl.program_id(3)
  q = q_ref[...]                                  # [rows, hdp], the pool's dtype
  qpos = qpos_ref[...]                            # [rows] int32
  rows, hdp = q.shape
  cb_tokens = pages_per_cb * tokens
  # float32 pools: exact float32 products (Triton would otherwise use TF32 for them).
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

  limit = info_ref[0]                             # min(kvlen, n_blocks * block tokens)
  key_hi = jnp.maximum(jnp.minimum(limit, jnp.max(qpos) + 1), 0)
  if has_window:
    window = info_ref[1]
    key_lo = jnp.maximum(jnp.min(qpos) - window + 1, 0)
  else:
    window = None
    key_lo = jnp.int32(0)
  lo_cb = lax.div(key_lo, jnp.int32(cb_tokens))
  hi_cb = _cdiv(key_hi, cb_tokens)
  per = _cdiv(jnp.maximum(hi_cb - lo_cb, 0), splits)
  start = lo_cb + j * per
  end = jnp.minimum(start + per, hi_cb)

  # Loop-invariant addressing inside a page: column n of a compute block is token n % T of its
  # page n // T; d past hd re-reads hd - 1 (its query column is zero).
  n = lax.broadcasted_iota(jnp.int32, (cols,), 0)
  page_of_n, tok = lax.div(n, jnp.int32(tokens)), lax.rem(n, jnp.int32(tokens))
  in_block = n < cb_tokens
  d = jnp.minimum(lax.broadcasted_iota(jnp.int32, (hdp,), 0), hd - 1)
  k_off = (h * hd + d[:, None]) * tokens + tok[None, :]          # [hdp, cols]
  v_off = (h * tokens + tok[:, None]) * hd + d[None, :]          # [cols, hdp]

  def body(cb, carry):
    m_prev, l_prev, acc = carry
    kpos = cb * cb_tokens + n                                     # [cols]
    live = in_block & (kpos < key_hi)
    col = jnp.minimum(cb * pages_per_cb + page_of_n, max_pages - 1)
    page = jnp.where(live, table_ref[col], 0)
    page = jnp.clip(page, 0, pool_pages - 1)
    kt = k_ref[jnp.broadcast_to(page[None, :], (hdp, cols)), k_off]   # [hdp, cols]
    vt = v_ref[jnp.broadcast_to(page[:, None], (cols, hdp)), v_off]   # [cols, hdp]
    sc = jnp.dot(q, kt, precision=precision, preferred_element_type=jnp.float32) * scale
    mask = live[None, :] & (kpos[None, :] <= qpos[:, None])
    if window is not None:
      mask &= kpos[None, :] > qpos[:, None] - window
    sc = jnp.where(mask, sc, _NEG)
    m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1))
    p = jnp.where(mask, jnp.exp(sc - m_new[:, None]), 0.0)
    corr = jnp.exp(m_prev - m_new)
    l_new = l_prev * corr + jnp.sum(p, axis=1)
    acc = acc * corr[:, None] + jnp.dot(p.astype(vt.dtype), vt, precision=precision,
                                        preferred_element_type=jnp.float32)
    return m_new, l_new, acc

  init = (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows, hdp), jnp.float32))
  m_i, l_i, acc = lax.fori_loop(start, end, body, init)
  o_ref[...] = acc
  l_ref[...] = l_i
  m_ref[...] = m_i


def paged_attention_pallas(q_SxQxKxGxH, qpos_SxQ, k_pool, v_pool, table_SxM, kvlen_S, n_blocks,
                           geom: KVGeometry, window=None, scale: float | None = None,
                           interpret: bool = False, *, block_rows: int | None = None,
                           pages_per_compute_block: int | None = None,
                           num_splits: int | None = None, num_warps: int = 4,
                           num_stages: int = 2):
  """Causal attention of S sequences' Q query tokens over their paged KV (one Pallas call).

  Arguments and result as `attention.paged_attention`: q [S, Q, K, G, hd], qpos [S, Q] absolute
  positions, pools [pages, slots, hd] (this device, this layer), table [S, M] page ids, kvlen [S],
  n_blocks (traced scalar: keys at or past `n_blocks * pages_per_block * T` are not seen), window
  None or a (traced) int W, scale of the scores (default hd ** -0.5). Returns [S, Q, K, G, hd] in
  q's dtype.

  interpret: run the kernel with Pallas' interpreter (any backend, e.g. CPU tests).
  block_rows: query rows (of Q * G per kv head) per program; a power of two >= 16 on GPUs.
  pages_per_compute_block: pages per inner-loop step (tile of that many pages * T tokens, padded
    to a power of two >= 16); default about 64 tokens.
  num_splits: programs sharing one row block's KV range (flash-decoding); default up to 8.
  num_warps, num_stages: Triton compiler parameters.
  """
  s, nq, k, g, hd = q_SxQxKxGxH.shape
  pool_pages, slots, _ = k_pool.shape
  t = geom.tokens_per_page
  m = table_SxM.shape[1]
  scale = check_arguments(q_SxQxKxGxH, k_pool, v_pool, geom, scale)

  r = nq * g
  rows = block_rows or min(_pow2(r), 64)
  if not interpret and (rows < _MIN_DOT or rows & (rows - 1)):
    raise ValueError(f"block_rows={rows}: Triton needs a power of two >= {_MIN_DOT}")
  rb = pl.cdiv(r, rows)
  rpad = rb * rows
  hdp = _pow2(hd)
  bp = pages_per_compute_block or max(1, min(m, 64 // t))
  cols = _pow2(bp * t)
  splits = num_splits or max(1, min(8, pl.cdiv(m, bp)))
  dt = k_pool.dtype

  # Rows r = q * G + g of each kv head: [S, K, Rpad, hdp] in the pool's dtype.
  qr = q_SxQxKxGxH.transpose(0, 2, 1, 3, 4).reshape(s, k, r, hd).astype(dt)
  qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rpad - r), (0, hdp - hd)))
  qpos = jnp.repeat(qpos_SxQ.astype(jnp.int32), g, axis=1)
  qpos = jnp.pad(qpos, ((0, 0), (0, rpad - r)), mode="edge")      # padding rows: last position
  blk_tokens = geom.pages_per_block * t
  limit = jnp.minimum(kvlen_S.astype(jnp.int32),
                      jnp.minimum(jnp.asarray(n_blocks, jnp.int32) * blk_tokens, m * t))
  win = jnp.zeros((), jnp.int32) if window is None else jnp.asarray(window, jnp.int32)
  info = jnp.stack([limit, jnp.broadcast_to(win, (s,))], axis=1)  # [S, 2]
  k2 = k_pool.reshape(pool_pages, slots * hd)                     # free views of the pools
  v2 = v_pool.reshape(pool_pages, slots * hd)

  kernel = functools.partial(
      _kernel, tokens=t, hd=hd, pages_per_cb=bp, cols=cols, splits=splits, scale=scale,
      has_window=window is not None, pool_pages=pool_pages, max_pages=m)
  o, l, mx = pl.pallas_call(
      kernel,
      grid=(s, k, rb, splits),
      in_specs=[
          pl.BlockSpec((None, 2), lambda a, b, c, e: (a, 0)),                     # info
          pl.BlockSpec((None, m), lambda a, b, c, e: (a, 0)),                     # table
          pl.BlockSpec((None, rows), lambda a, b, c, e: (a, c)),                  # qpos
          pl.BlockSpec((None, None, rows, hdp), lambda a, b, c, e: (a, b, c, 0)),  # q
          pl.BlockSpec((pool_pages, slots * hd), lambda a, b, c, e: (0, 0)),      # k pool
          pl.BlockSpec((pool_pages, slots * hd), lambda a, b, c, e: (0, 0)),      # v pool
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, hdp), lambda a, b, c, e: (e, a, b, c, 0)),
          pl.BlockSpec((None, None, None, rows), lambda a, b, c, e: (e, a, b, c)),
          pl.BlockSpec((None, None, None, rows), lambda a, b, c, e: (e, a, b, c)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((splits, s, k, rpad, hdp), jnp.float32),
          jax.ShapeDtypeStruct((splits, s, k, rpad), jnp.float32),
          jax.ShapeDtypeStruct((splits, s, k, rpad), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="flying_paged_attention",
  )(info, table_SxM.astype(jnp.int32), qpos, qr, k2, v2)

  # Merge the splits (flash-decoding's last step).
  m_max = mx.max(axis=0)
  corr = jnp.exp(mx - m_max[None])
  l_sum = (l * corr).sum(axis=0)
  out = (o * corr[..., None]).sum(axis=0) / jnp.maximum(l_sum, 1e-30)[..., None]
  out = out[:, :, :r, :hd].reshape(s, k, nq, g, hd).transpose(0, 2, 1, 3, 4)
  return out.astype(q_SxQxKxGxH.dtype)
