"""The Pallas TPU paged-attention kernel against the reference `attention.paged_attention`.

On CPU the kernel runs in Pallas' TPU interpret mode, which simulates HBM, VMEM, the DMAs and
their semaphores, and raises on any read outside a buffer (so a garbage page id that reached a
DMA would fail): float32 within 1e-5, bfloat16 pools within a loose tolerance. One test runs
the double buffer with DMAs executed as soon as they start and the race detector on, over two
simulated cores. The last tests lower the kernel for TPU without a TPU and check the step is one
Mosaic call with no XLA while loop.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernel_cases import MAX_PAGES, SLOTS
from kernel_cases import assert_close, case as _case, pools as _pools

from flying_jax.model.attention import KVGeometry, paged_attention
from flying_jax.model.kernels import paged_attention_tpu

TOL = 1e-5
# Interpret-mode kernels are large XLA programs; LLVM's optimisations only cost compile time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(fn, args):
  return np.asarray(jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args))


def _compare(name, geom, pools, case, window=None, scale=None, tol=TOL, **kernel_kw):
  """Kernel (interpret mode) and reference on the same arguments, the window and n_blocks traced."""
  q, qpos, table, kvlen, n_blocks = case
  args = (q, qpos, *pools, table, kvlen, n_blocks, None if window is None else jnp.int32(window))
  kernel_kw.setdefault("interpret", True)
  want = _run(lambda *a: paged_attention(*a[:7], geom, a[7], scale), args)
  got = _run(lambda *a: paged_attention_tpu(*a[:7], geom, a[7], scale, **kernel_kw), args)
  assert_close(name, got, want, tol)
  return got, want


def test_decode_ragged_grouped():
  """Decode rows (Q=1), G=3, ragged lengths with empty rows; three pages per compute block, so
  the longest sequence takes 5 double-buffered steps and others end mid-block."""
  geom = KVGeometry(SLOTS, 2, 2, MAX_PAGES)                 # 8 tokens per page
  case = _case(1, geom, [13, 0, 96, 1, 40, 0], 1, 3)
  got, want = _compare("decode G=3 kv_per_device=2", geom, _pools(0), case,
                       pages_per_compute_block=3)
  assert (got[1] == 0).all() and (got[5] == 0).all() and (want[1] == 0).all()


def test_prefill_chunks_in_row_blocks():
  """Prefill rows (Q=12, causal inside the chunk), G=1, cut into row blocks of 8 (the second
  one padded): a chunk at the start of its sequence, one mid-sequence across pages, a padding
  row; one page per compute block."""
  geom = KVGeometry(SLOTS, 2, 3, MAX_PAGES)
  case = _case(2, geom, [12, 29, 0, 90], 12, 1)
  _compare("prefill Q=12 G=1 kv_per_device=2", geom, _pools(0), case, block_rows=8,
           pages_per_compute_block=1)


@pytest.mark.parametrize("kv_per_device", [1, 4, 3])
def test_page_interpretations_of_one_pool(kv_per_device):
  """The pool bytes (slots=16) the other tests read with 2 heads per device (8 tokens a page),
  read with 1, 4 and 3 (16, 4 and 5 tokens a page: slot 15 unused, T not a power of two);
  prefill chunk of 3, G=2; with one head the default compute block (128 tokens: 8 pages), with
  more 3 pages (fewer unrolled products to interpret)."""
  geom = KVGeometry(SLOTS, kv_per_device, 2, MAX_PAGES)
  t = geom.tokens_per_page
  case = _case(3, geom, [5 * t + 3, t, 0, 3], 3, 2)
  tuning = {} if kv_per_device == 1 else {"pages_per_compute_block": 3}
  _compare(f"kv_per_device={kv_per_device} (T={t}) Q=3 G=2", geom, _pools(0), case, **tuning)


@pytest.mark.parametrize("q_len", [1, 5])
def test_sliding_window(q_len):
  """A window of 7 that binds (sequences up to 90 tokens, blocks wholly before the window are
  skipped): decode and prefill rows, G=3."""
  geom = KVGeometry(SLOTS, 2, 2, MAX_PAGES)
  case = _case(4, geom, [90, 8, 0, 47], q_len, 3)
  assert int(case[1].max()) - 7 + 1 > 2 * geom.pages_per_block * geom.tokens_per_page
  _compare(f"window=7 Q={q_len} G=3", geom, _pools(0), case, window=7,
           pages_per_compute_block=2)


def test_scale_and_n_blocks_short_of_a_sequence():
  """An explicit scale, G=1 decode, and n_blocks that stops short of one sequence's keys (keys
  past n_blocks * pages_per_block * T are not seen), mid compute block (3 pages, 12 tokens)."""
  geom = KVGeometry(SLOTS, 4, 1, MAX_PAGES)                 # 4 tokens per page and block
  q, qpos, table, kvlen, _ = _case(5, geom, [17, 44, 2], 1, 1)
  _compare("scale=0.3 n_blocks=8 (32 keys)", geom, _pools(5), (q, qpos, table, kvlen,
                                                               jnp.int32(8)),
           scale=0.3, pages_per_compute_block=3)


def test_bfloat16_pools():
  """bfloat16 pools (operands of both products in bfloat16, float32 softmax): within bfloat16
  rounding of the reference, which computes in float32 from the same stored values."""
  geom = KVGeometry(SLOTS, 2, 2, MAX_PAGES)
  case = _case(6, geom, [30, 0, 77], 4, 2)
  _compare("bf16 Q=4 G=2", geom, _pools(6, jnp.bfloat16), case, tol=2e-2,
           pages_per_compute_block=2)


def test_double_buffer_has_no_race():
  """DMAs executed as soon as they start (a prefetch into the half being read would change the
  result) and the interpreter's race detector on, the grid shared by two simulated cores."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter

  geom = KVGeometry(SLOTS, 2, 2, MAX_PAGES)
  case = _case(7, geom, [61, 5, 96, 0], 2, 2)
  params = pltpu.InterpretParams(dma_execution_mode="eager", detect_races=True,
                                 num_cores_or_threads=2)
  _compare("eager DMAs, race detector, 2 cores", geom, _pools(7), case, interpret=params,
           pages_per_compute_block=2)
  races = getattr(tpu_interpreter, "races", None)
  assert races is not None and not races.races_found


# --- lowering for the TPU without a TPU ---

def _outside_kernel(text):
  """The module text without the serialized Mosaic bodies of custom calls."""
  return re.sub(r'backend_config = "(?:[^"\\]|\\.)*"', 'backend_config = "..."', text)


@pytest.mark.parametrize("kv_per_device,q_len", [(2, 1), (3, 16)])
def test_lowers_for_tpu_as_one_mosaic_call(kv_per_device, q_len):
  """bf16 pool, hd=128, traced window: one Mosaic custom call and no stablehlo.while outside it
  (the reference has one), decode (T=128) and a prefill chunk with T not a power of two (T=85)."""
  slots, hd, pages, m = 256, 128, 64, 32
  geom = KVGeometry(slots, kv_per_device, 4, m)
  s, g = 4, 4
  args = (jnp.zeros((s, q_len, kv_per_device, g, hd), jnp.bfloat16),
          jnp.zeros((s, q_len), jnp.int32),
          jnp.zeros((pages, slots, hd), jnp.bfloat16), jnp.zeros((pages, slots, hd), jnp.bfloat16),
          jnp.zeros((s, m), jnp.int32), jnp.zeros((s,), jnp.int32), jnp.int32(3), jnp.int32(100))

  def lowered(fn):
    return jax.jit(functools.partial(fn, geom=geom)).trace(*args).lower(
        lowering_platforms=("tpu",)).as_text()

  outside = _outside_kernel(lowered(
      lambda q, qp, k, v, t, l, n, w, geom: paged_attention_tpu(q, qp, k, v, t, l, n, geom, w)))
  assert outside.count("@tpu_custom_call") == 1, outside
  assert "stablehlo.while" not in outside
  ref = lowered(lambda q, qp, k, v, t, l, n, w, geom: paged_attention(q, qp, k, v, t, l, n, geom,
                                                                      w))
  assert "stablehlo.while" in ref
