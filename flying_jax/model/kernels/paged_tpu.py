"""Paged attention as one Pallas kernel for TPUs (Mosaic) over flying-jax's own KV page layout.

Same signature and semantics as `flying_jax.model.attention.paged_attention` (the reference),
without its XLA while loop, whose trip count is a run-time value: here the grid is static and
everything that depends on the step (page ids, lengths, positions, `n_blocks`, the window) reaches
the kernel as data, through scalar prefetch into SMEM, and the loop over a sequence's pages runs
inside the kernel.

Layout read in place. The pool on one device is `[pages, slots, hd]` (one layer's, or the layers
of a page space stacked and read as one pool, the table holding each layer's page ids) and stays
in HBM (`memory_space=pl.ANY`); DMAs address whole pages (`pool.at[page]`), never a flat element
offset, so a pool past 2^31 elements is fine. Under the width's page interpretation (`KVGeometry`)
a page holds `T = slots // kv_per_device` tokens per head; head h owns slot rows `[h*T, (h+1)*T)`
of the page, in both pools: V reads them as `[T, hd]` (token, d), K reads the same `T * hd`
elements as `[hd, T]` (d, token: keys stored transposed). So any interpretation of the same bytes
(kv_per_device 1, 2, 3, 4 of one `slots`, `T` not a power of two included) is read without a copy
outside the kernel.

Grid `(S, row blocks)`, both "parallel" (each program starts and waits its own DMAs, so the two
TensorCores of a megacore chip may split it). Rows of one kv head are its `Q * G` queries,
row `r = q * G + g`, cut into blocks of `block_rows` consecutive rows, so causal and window
bounds are tight per block. One program handles every kv head of its rows, because a page
holds all heads: each page is fetched once, as one DMA per pool, for all of them.

A program walks compute blocks of `pages_per_compute_block` pages, from the first block its
earliest query's window reaches (0 without a window) to the block of its last visible key
(`min(kvlen, n_blocks * pages_per_block * T, last position + 1)`); these bounds are computed by
a few XLA element-wise ops before the call and prefetched. The pages of block `b + 1` are copied
HBM -> VMEM (`make_async_copy`) into one half of a double buffer while block `b` is computed from
the other half. Per kv head and page the scores `q @ K` are float32 (operands in the pool dtype),
and one online-softmax update per compute block keeps the running max, sum and output in VMEM
scratch (float32). Table entries past a sequence's visible keys may be anything: the table is
cleaned beforehand (those entries read page 0, masked out) so no DMA leaves the pool.

TPU tiling (the last two dims of a VMEM block a multiple of (8, 128) or the full dims):
* q and the output are `[S, K, rows, hd]` blocks `(K, block_rows, hd)`: hd is the full dim;
  rows are padded with zero queries (their output is dropped) to a multiple of the sublane
  tile, 8 for 32-bit and 16 for 16-bit dtypes;
* positions per row come as `[S, rows, 1]` int32 blocks (last dim full);
* the running max and sum are `[K, rows, 128]` float32 scratch, broadcast over 128 lanes as
  the TPU flash-attention kernels keep them (a `[rows, 1]` ref would have an awkward layout);
* page buffers are `[2, pages_per_compute_block, slots, hd]`: whole pages, so every DMA is a
  full, tile-aligned `[slots, hd]` copy; Mosaic pads `slots` to the sublane tile and `hd` to 128
  lanes in VMEM (hd=64 uses twice its size), nothing is padded in HBM.
Believed, not yet checked on hardware (tests run in interpret mode and lower for TPU on a CPU):
reading head h's rows at offset `h * T` is tile-aligned when `T` is a multiple of 8 (16 for
bf16: every TPU preset, 16 tokens per page per head); other `T` need Mosaic's unaligned sublane
slices. K's `[T, hd] -> [hd, T]` reinterpretation is a value reshape in VMEM (a no-op when
`T == hd`); whether Mosaic's layout passes accept it for every `T` is the open question of this
kernel on hardware. The static loops unroll `pages_per_compute_block * K` matmul pairs per
block; defaults aim at about 128 tokens per compute block, not yet timed. Scores of small `T` use
a fraction of the 128 lanes. The flattened table (`S * M` int32, padded to whole compute blocks)
sits in SMEM: a 256-row decode bucket over 512-page tables is 512 KiB, which may not fit; such
shapes would need the table rows DMA'd per program instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flying_jax.model.attention import KVGeometry
from flying_jax.model.kernels.common import check_arguments

_NEG = -1e30          # the reference's mask value: exp(_NEG - m) is 0, _NEG - _NEG is 0
_LANES = 128


def _sublane_tile(*dtypes) -> int:
  """Rows of one native TPU tile for the narrowest dtype (8 for 32-bit, 16 for 16-bit)."""
  return max(8 * max(1, 4 // jnp.dtype(d).itemsize) for d in dtypes)


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def _kernel(table_ref, bounds_ref, limit_ref, window_ref,      # scalar prefetch (SMEM)
            q_ref, qpos_ref, k_hbm, v_hbm,                     # inputs
            o_ref,                                             # output
            kbuf, vbuf, sems, m_ref, l_ref, acc_ref,           # scratch
            *, tokens: int, pages_per_cb: int, table_cols: int, has_window: bool,
            precision):
  """One (sequence, row block): every kv head over its range of compute blocks."""
  s, rb = pl.program_id(0), pl.program_id(1)
  n_heads, _, hd = q_ref.shape
  cb_tokens = pages_per_cb * tokens
  prog = s * pl.num_programs(1) + rb
  lo, hi = bounds_ref[2 * prog], bounds_ref[2 * prog + 1]   # compute blocks [lo, hi)
  limit = limit_ref[s]
  window = window_ref[0]

  def copies(cb, slot):
    """The DMAs of compute block cb's pages into half `slot` of the buffers (K and V)."""
    out = []
    for i in range(pages_per_cb):
      page = table_ref[s * table_cols + cb * pages_per_cb + i]
      out.append(pltpu.make_async_copy(k_hbm.at[page], kbuf.at[slot, i], sems.at[0, slot]))
      out.append(pltpu.make_async_copy(v_hbm.at[page], vbuf.at[slot, i], sems.at[1, slot]))
    return out

  m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(lo < hi)
  def _first():
    for c in copies(lo, 0):
      c.start()

  qpos = qpos_ref[...]                                       # [rows, 1] int32

  def body(cb, carry):
    slot = lax.rem(cb - lo, 2)

    @pl.when(cb + 1 < hi)
    def _prefetch():
      for c in copies(cb + 1, 1 - slot):
        c.start()

    for c in copies(cb, slot):
      c.wait()
    masks = []                                               # per page: [rows, T]
    for i in range(pages_per_cb):
      kpos = cb * cb_tokens + i * tokens + lax.broadcasted_iota(jnp.int32, (1, tokens), 1)
      mask = (kpos < limit) & (kpos <= qpos)
      if has_window:
        mask &= kpos > qpos - window
      masks.append(mask)
    for h in range(n_heads):
      _update_head(h, slot, q_ref, kbuf, vbuf, masks, m_ref, l_ref, acc_ref,
                   tokens=tokens, hd=hd, precision=precision)
    return carry

  lax.fori_loop(lo, hi, body, 0)
  l = l_ref[...][:, :, :1]
  o_ref[...] = (acc_ref[...] / jnp.maximum(l, 1e-30)).astype(o_ref.dtype)


def _update_head(h, slot, q_ref, kbuf, vbuf, masks, m_ref, l_ref, acc_ref, *, tokens, hd,
                 precision):
  """One online-softmax step of kv head h over the pages of the compute block in `slot`."""
  q = q_ref[h]                                               # [rows, hd], pool dtype
  rows = q.shape[0]
  rows_of_h = pl.ds(h * tokens, tokens)
  scores = []
  for i, mask in enumerate(masks):
    kt = kbuf[slot, i, rows_of_h, :]                         # [T, hd]: the bytes of K^T
    if tokens != hd:
      kt = kt.reshape(hd, tokens)                            # (d, token), keys stored transposed
    sc = jnp.dot(q, kt, precision=precision, preferred_element_type=jnp.float32)
    scores.append(jnp.where(mask, sc, _NEG))
  m_prev = m_ref[h]                                          # [rows, 128], lanes equal
  m_cur = functools.reduce(jnp.maximum, [sc.max(axis=1, keepdims=True) for sc in scores])
  m_new = jnp.maximum(m_prev, m_cur)                         # [rows, 128]
  m1 = m_new[:, :1]
  corr = jnp.exp(m_prev[:, :1] - m1)                         # [rows, 1]
  l_add = jnp.zeros((rows, 1), jnp.float32)
  pv = jnp.zeros((rows, hd), jnp.float32)
  for i, (sc, mask) in enumerate(zip(scores, masks)):
    p = jnp.where(mask, jnp.exp(sc - m1), 0.0)               # [rows, T] float32
    l_add += p.sum(axis=1, keepdims=True)
    v = vbuf[slot, i, rows_of_h, :]                          # [T, hd]
    pv += jnp.dot(p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
  m_ref[h] = m_new
  l_ref[h] = l_ref[h] * corr + l_add
  acc_ref[h] = acc_ref[h] * corr + pv


def _block_bounds(qpos_SxRB, limit_S, window, cb_tokens: int):
  """Compute blocks [lo, hi) per (sequence, row block), flattened: qpos_SxRB is [S, rb, rows]."""
  hi_tok = jnp.maximum(jnp.minimum(limit_S[:, None], qpos_SxRB.max(-1) + 1), 0)
  if window is None:
    lo_tok = jnp.zeros_like(hi_tok)
  else:
    lo_tok = jnp.maximum(qpos_SxRB.min(-1) - window + 1, 0)
  lo, hi = lo_tok // cb_tokens, -(-hi_tok // cb_tokens)
  return jnp.stack([lo, jnp.maximum(hi, lo)], axis=-1).reshape(-1).astype(jnp.int32)


def _kernel_inputs(q_SxQxKxGxH, qpos_SxQ, table_SxM, kvlen_S, n_blocks, window, geom, scale,
                   dt, *, rows: int, row_blocks: int, pages_per_cb: int, pool_pages: int):
  """What the kernel reads, made by a few XLA element-wise ops: queries [S, K, rows, hd] (row
  `q * G + g`, scaled in float32 as the reference does, then in the pool's dtype, padding rows
  zero), positions [S, rows, 1] (padding rows repeat the last), the table with whole compute
  blocks of columns and every entry past a sequence's visible keys replaced by page 0 (masked
  out, so no DMA leaves the pool), compute-block bounds per program and visible keys per
  sequence (`min(kvlen, n_blocks * pages_per_block * T, M * T)`)."""
  s, nq, k, g, hd = q_SxQxKxGxH.shape
  t, m = geom.tokens_per_page, table_SxM.shape[1]
  r = nq * g
  qr = (q_SxQxKxGxH.astype(jnp.float32) * scale).transpose(0, 2, 1, 3, 4).reshape(s, k, r, hd)
  qr = jnp.pad(qr.astype(dt), ((0, 0), (0, 0), (0, rows - r), (0, 0)))
  qpos = jnp.repeat(qpos_SxQ.astype(jnp.int32), g, axis=1)
  qpos = jnp.pad(qpos, ((0, 0), (0, rows - r)), mode="edge")
  limit = jnp.minimum(kvlen_S.astype(jnp.int32),
                      jnp.minimum(jnp.asarray(n_blocks, jnp.int32) * geom.pages_per_block * t,
                                  m * t))
  win = None if window is None else jnp.asarray(window, jnp.int32)
  bounds = _block_bounds(qpos.reshape(s, row_blocks, -1), limit, win, pages_per_cb * t)
  cols = _round_up(m, pages_per_cb)
  col = jnp.arange(cols, dtype=jnp.int32)
  table = jnp.pad(table_SxM.astype(jnp.int32), ((0, 0), (0, cols - m)))
  table = jnp.where(col[None, :] * t < limit[:, None], jnp.clip(table, 0, pool_pages - 1), 0)
  return qr, qpos[..., None], table, bounds, limit


def paged_attention_tpu(q_SxQxKxGxH, qpos_SxQ, k_pool, v_pool, table_SxM, kvlen_S, n_blocks,
                        geom: KVGeometry, window=None, scale: float | None = None,
                        interpret=False, *, block_rows: int | None = None,
                        pages_per_compute_block: int | None = None,
                        vmem_limit_bytes: int | None = None):
  """Causal attention of S sequences' Q query tokens over their paged KV (one Pallas TPU call).

  Arguments and result as `attention.paged_attention`: q [S, Q, K, G, hd], qpos [S, Q] absolute
  positions, pools [pages, slots, hd] (this device, this layer), table [S, M] page ids, kvlen [S],
  n_blocks (traced scalar: keys at or past `n_blocks * pages_per_block * T` are not seen), window
  None or a (traced) int W, scale of the scores (default hd ** -0.5). Returns [S, Q, K, G, hd] in
  q's dtype.

  interpret: run with Pallas' TPU interpreter on any backend (CPU tests): True for the default
    `pltpu.InterpretParams()` (simulated HBM, VMEM, DMAs and semaphores), or an instance.
  block_rows: query rows (of Q * G per kv head) per program, rounded up to the sublane tile;
    default all of them up to 128.
  pages_per_compute_block: pages per inner-loop step and per DMA buffer half; default about 128
    tokens.
  vmem_limit_bytes: Mosaic's scoped VMEM limit, if the buffers need more than its default.
  """
  s, nq, k, g, hd = q_SxQxKxGxH.shape
  pool_pages, slots, _ = k_pool.shape
  t = geom.tokens_per_page
  m = table_SxM.shape[1]
  scale = check_arguments(q_SxQxKxGxH, k_pool, v_pool, geom, scale)
  dt = k_pool.dtype

  r = nq * g
  tile = _sublane_tile(dt, q_SxQxKxGxH.dtype)
  rows = _round_up(block_rows or min(r, 128), tile)
  rb = pl.cdiv(r, rows)
  bp = pages_per_compute_block or max(1, min(m, _LANES // t))
  qr, qpos, table, bounds, limit = _kernel_inputs(
      q_SxQxKxGxH, qpos_SxQ, table_SxM, kvlen_S, n_blocks, window, geom, scale, dt,
      rows=rb * rows, row_blocks=rb, pages_per_cb=bp, pool_pages=pool_pages)
  win = jnp.zeros((1,), jnp.int32) if window is None else jnp.asarray(window, jnp.int32).reshape(1)

  kernel = functools.partial(
      _kernel, tokens=t, pages_per_cb=bp, table_cols=table.shape[1], has_window=window is not None,
      precision=lax.Precision.HIGHEST if dt == jnp.float32 else None)
  row_spec = pl.BlockSpec((None, k, rows, hd), lambda a, b, *_: (a, 0, b, 0))
  if interpret is True:
    interpret = pltpu.InterpretParams()
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(s, rb),
          in_specs=[
              row_spec,                                                      # q
              pl.BlockSpec((None, rows, 1), lambda a, b, *_: (a, b, 0)),     # qpos
              pl.BlockSpec(memory_space=pl.ANY),                             # k pool (HBM)
              pl.BlockSpec(memory_space=pl.ANY),                             # v pool (HBM)
          ],
          out_specs=row_spec,
          scratch_shapes=[
              pltpu.VMEM((2, bp, slots, hd), dt),                            # K double buffer
              pltpu.VMEM((2, bp, slots, hd), dt),                            # V double buffer
              pltpu.SemaphoreType.DMA((2, 2)),                               # [K/V, half]
              pltpu.VMEM((k, rows, _LANES), jnp.float32),                    # running max
              pltpu.VMEM((k, rows, _LANES), jnp.float32),                    # running sum
              pltpu.VMEM((k, rows, hd), jnp.float32),                        # output
          ]),
      out_shape=jax.ShapeDtypeStruct((s, k, rb * rows, hd), q_SxQxKxGxH.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                           vmem_limit_bytes=vmem_limit_bytes),
      interpret=interpret,
      name="flying_paged_attention_tpu",
  )(table.reshape(-1), bounds, limit, win, qr, qpos, k_pool, v_pool)
  out = out[:, :, :r].reshape(s, k, nq, g, hd).transpose(0, 2, 1, 3, 4)
  return out
