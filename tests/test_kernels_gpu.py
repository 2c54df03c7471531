"""The Pallas (Triton) paged-attention kernel against the reference `attention.paged_attention`.

On CPU the kernel runs in Pallas interpret mode (float32, within 1e-5); the last tests lower it
for the GPU platform without a GPU and check the step is one Triton call with no XLA while loop.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import MAX_PAGES, SLOTS
from kernel_cases import assert_close, case as _case, pools as _pools

from flying_jax.model.attention import KVGeometry, paged_attention
from flying_jax.model.kernels import paged_attention_pallas

TOL = 1e-5


def _compare(name, geom, pools, case, window=None, scale=None, **kernel_kw):
  q, qpos, table, kvlen, n_blocks = case
  k_pool, v_pool = pools
  win = None if window is None else jnp.int32(window)

  def ref(q, qpos, kp, vp, table, kvlen, nb, w):
    return paged_attention(q, qpos, kp, vp, table, kvlen, nb, geom, w, scale)

  def ker(q, qpos, kp, vp, table, kvlen, nb, w):
    return paged_attention_pallas(q, qpos, kp, vp, table, kvlen, nb, geom, w, scale,
                                  interpret=True, **kernel_kw)

  args = (q, qpos, k_pool, v_pool, table, kvlen, n_blocks, win)
  want = np.asarray(jax.jit(ref)(*args))
  got = np.asarray(jax.jit(ker)(*args))
  assert_close(name, got, want, TOL)
  return got, want


def test_decode_ragged_grouped():
  """Decode rows (Q=1), G=3, ragged lengths with empty rows, several splits."""
  geom = KVGeometry(SLOTS, 2, 2, MAX_PAGES)                 # 8 tokens per page
  case = _case(1, geom, [13, 0, 96, 1, 40, 0], 1, 3)
  got, want = _compare("decode G=3 kv_per_device=2", geom, _pools(0), case, num_splits=3)
  assert (got[1] == 0).all() and (got[5] == 0).all() and (want[1] == 0).all()


def test_prefill_chunks():
  """Prefill rows (Q=chunk, causal inside the chunk), G=1: a chunk at the start of its sequence,
  one mid-sequence across pages, a padding row; row blocks smaller than Q*G, one page per step."""
  geom = KVGeometry(SLOTS, 2, 3, MAX_PAGES)
  case = _case(2, geom, [6, 29, 0, 90], 6, 1)
  _compare("prefill G=1 kv_per_device=2", geom, _pools(0), case, block_rows=4,
           pages_per_compute_block=1)


@pytest.mark.parametrize("kv_per_device", [1, 4, 3])
def test_page_interpretations_of_one_pool(kv_per_device):
  """The pool bytes (slots=16) the other tests read with 2 heads per device (8 tokens a page),
  read with 1 and 4 (16 and 4 tokens a page) and 3 (5 tokens a page: slot 15 unused, T not a
  power of two); prefill chunk of 3, G=2."""
  geom = KVGeometry(SLOTS, kv_per_device, 2, MAX_PAGES)
  t = geom.tokens_per_page
  case = _case(3, geom, [5 * t + 3, t, 0, 3], 3, 2)
  _compare(f"kv_per_device={kv_per_device} (T={t}) Q=3 G=2", geom, _pools(0), case)


@pytest.mark.parametrize("q_len", [1, 5])
def test_sliding_window(q_len):
  """A window of 7 that binds (sequences up to 90 tokens): decode and prefill rows, G=3."""
  geom = KVGeometry(SLOTS, 2, 2, MAX_PAGES)
  case = _case(4, geom, [90, 8, 0, 47], q_len, 3)
  assert int(case[1].max()) - 7 + 1 > 2 * geom.pages_per_block * geom.tokens_per_page
  _compare(f"window=7 Q={q_len} G=3", geom, _pools(0), case, window=7, num_splits=2)


def test_scale_head_dim_padding_and_n_blocks():
  """An explicit scale, G=1 decode with hd=12 (padded to 16 in the kernel), and n_blocks that
  stops short of one sequence's keys (keys past n_blocks * pages_per_block * T are not seen)."""
  geom = KVGeometry(SLOTS, 4, 1, MAX_PAGES)                 # 4 tokens per page and block
  q, qpos, table, kvlen, _ = _case(5, geom, [17, 44, 2], 1, 1, hd=12)
  _compare("scale=0.3 hd=12 n_blocks=8 (32 keys)", geom, _pools(5, hd=12),
           (q, qpos, table, kvlen, jnp.int32(8)), scale=0.3)


# --- lowering for the GPU without a GPU ---

def _strip_kernel_ir(text):
  """The module text without the serialized Triton IR of custom calls."""
  return re.sub(r'ir = "(?:[^"\\]|\\.)*"', 'ir = "..."', text)


def _cuda_lowering_or_skip():
  """Pallas' Triton lowering needs only jaxlib; skip (saying why) if this jax cannot do it."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  def add_one(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0

  f = jax.jit(lambda x: pl.pallas_call(add_one, out_shape=x,
                                       compiler_params=plgpu.CompilerParams())(x))
  try:
    f.trace(jnp.zeros((16,), jnp.float32)).lower(lowering_platforms=("cuda",))
  except Exception as e:  # noqa: BLE001 - any failure means: no cuda lowering on this machine
    pytest.skip(f"this jax/jaxlib cannot lower Pallas for cuda without a GPU: {e!r}")


@pytest.mark.parametrize("kv_per_device,q_len", [(2, 1), (3, 16)])
def test_lowers_for_gpu_as_one_triton_call(kv_per_device, q_len):
  """bf16 pool, hd=128, traced window: one Triton custom call and no stablehlo.while outside it
  (the reference has one), decode and a prefill chunk with T not a power of two (T=85)."""
  _cuda_lowering_or_skip()
  slots, hd, pages, m = 256, 128, 64, 32
  geom = KVGeometry(slots, kv_per_device, 4, m)
  s, g = 4, 4
  args = (jnp.zeros((s, q_len, kv_per_device, g, hd), jnp.bfloat16),
          jnp.zeros((s, q_len), jnp.int32),
          jnp.zeros((pages, slots, hd), jnp.bfloat16), jnp.zeros((pages, slots, hd), jnp.bfloat16),
          jnp.zeros((s, m), jnp.int32), jnp.zeros((s,), jnp.int32), jnp.int32(3), jnp.int32(100))

  def ker(q, qp, k, v, t, l, n, w):
    return paged_attention_pallas(q, qp, k, v, t, l, n, geom, w)

  def ref(q, qp, k, v, t, l, n, w):
    return paged_attention(q, qp, k, v, t, l, n, geom, w)

  text = jax.jit(ker).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  outside = _strip_kernel_ir(text)
  assert outside.count("__gpu$xla.gpu.triton") == 1, outside
  assert "stablehlo.while" not in outside
  ref_text = jax.jit(ref).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.while" in ref_text
