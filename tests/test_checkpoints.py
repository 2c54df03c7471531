"""Checkpoint loading: GGUF (real SmolLM2 and hand-made files), safetensors round trips, random init."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from flying_jax import checkpoints as ck
from flying_jax.config import ConfigError, load_model_card

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "smollm2-135m-instruct.json"


# ---------------------------------------------------------------- numpy reference forward

def _rmsnorm(x, w, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_rotate_half(x, theta):
  """x: [T, H, hd], positions 0..T-1, Hugging Face rotate-half convention."""
  t, _, hd = x.shape
  inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
  ang = np.arange(t)[:, None] * inv[None, :]
  cos, sin = np.cos(ang)[:, None, :].astype(np.float32), np.sin(ang)[:, None, :].astype(np.float32)
  x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _rope_interleaved(x, theta):
  """x: [T, H, hd], GPT-J / llama.cpp convention: pairs (2i, 2i+1) rotate together."""
  t, _, hd = x.shape
  inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
  ang = np.arange(t)[:, None] * inv[None, :]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  xe, xo = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = xe * cos - xo * sin, xo * cos + xe * sin
  return out


def _block(w, arch, layer, x):
  a = arch
  n = _rmsnorm(x, w["attn_norm"][layer], a.norm_eps)
  q = _rope_rotate_half(np.einsum("td,dhk->thk", n, w["wq"][layer]), a.rope_theta)
  k = _rope_rotate_half(np.einsum("td,dhk->thk", n, w["wk"][layer]), a.rope_theta)
  v = np.einsum("td,dhk->thk", n, w["wv"][layer])
  k, v = np.repeat(k, a.group_size, axis=1), np.repeat(v, a.group_size, axis=1)
  s = np.einsum("thk,shk->hts", q, k) / np.sqrt(a.head_dim)
  s = s + np.triu(np.full(s.shape[1:], -np.inf, np.float32), 1)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  h = x + np.einsum("thk,hkd->td", np.einsum("hts,shk->thk", p, v), w["wo"][layer])
  n = _rmsnorm(h, w["ffn_norm"][layer], a.norm_eps)
  g = n @ w["w_gate"][layer]
  return h + (g / (1 + np.exp(-g)) * (n @ w["w_up"][layer])) @ w["w_down"][layer]


def _last_logits(w, arch, ids):
  x = w["embed"][np.asarray(ids)]
  for layer in range(arch.n_layers):
    x = _block(w, arch, layer, x)
  head = w["embed"] if arch.tied_embeddings else w["lm_head"]
  return _rmsnorm(x[-1], w["final_norm"], arch.norm_eps) @ head.T


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def smollm2():
  card = load_model_card("smollm2-135m")
  if importlib.util.find_spec(card.weights.package) is None:
    pytest.fail(f"{card.weights.package} is not installed (make test installs it)")
  return card, ck.load_checkpoint(card)


@pytest.fixture(scope="module")
def tiny():
  card = load_model_card("tiny")
  return card, ck.load_checkpoint(card)


def _card_with(card, **weights):
  return dataclasses.replace(card, weights=dataclasses.replace(card.weights, **weights))


def _write_gguf(path, weights, arch, qtype):
  """A llama GGUF of canonical `weights`, matrices stored as `qtype`, Q/K rows permuted."""
  import gguf

  a = arch
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(a.n_layers)
  w.add_embedding_length(a.dim)
  w.add_head_count(a.n_heads)
  w.add_head_count_kv(a.n_kv_heads)
  w.add_feed_forward_length(a.ffn_dim)
  w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])

  def put(name, m):
    m = np.ascontiguousarray(m, np.float32)
    if qtype == gguf.GGMLQuantizationType.F32 or m.ndim == 1:
      w.add_tensor(name, m)
    else:
      w.add_tensor(name, gguf.quants.quantize(m, qtype), raw_dtype=qtype)

  put("token_embd.weight", weights["embed"])
  put("output.weight", weights["lm_head"])
  put("output_norm.weight", weights["final_norm"])
  for i in range(a.n_layers):
    q = weights["wq"][i].reshape(a.dim, -1).T
    k = weights["wk"][i].reshape(a.dim, -1).T
    put(f"blk.{i}.attn_q.weight", ck.permute_rope_rows(q, a.n_heads))
    put(f"blk.{i}.attn_k.weight", ck.permute_rope_rows(k, a.n_kv_heads))
    put(f"blk.{i}.attn_v.weight", weights["wv"][i].reshape(a.dim, -1).T)
    put(f"blk.{i}.attn_output.weight", weights["wo"][i].reshape(-1, a.dim).T)
    put(f"blk.{i}.ffn_gate.weight", weights["w_gate"][i].T)
    put(f"blk.{i}.ffn_up.weight", weights["w_up"][i].T)
    put(f"blk.{i}.ffn_down.weight", weights["w_down"][i].T)
    put(f"blk.{i}.attn_norm.weight", weights["attn_norm"][i])
    put(f"blk.{i}.ffn_norm.weight", weights["ffn_norm"][i])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _assert_same(a, b, atol=0.0):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


# ---------------------------------------------------------------- real SmolLM2 GGUF

def test_smollm2_gguf_shapes(smollm2):
  card, w = smollm2
  assert w["embed"].shape == (49152, 576)
  assert w["wq"].shape == (30, 576, 9, 64) and w["wk"].shape == (30, 576, 3, 64)
  assert w["wo"].shape == (30, 9, 64, 576) and w["w_down"].shape == (30, 1536, 576)
  assert "lm_head" not in w
  assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in w.values())
  ck.check_shapes(w, card.arch)


@pytest.mark.parametrize("case", ["chat_france", "capital_plain"])
def test_smollm2_matches_golden_first_step(smollm2, case):
  assert GOLDEN.exists(), f"{GOLDEN} not found (shared/ must sit beside the repository)"
  card, w = smollm2
  golden = json.loads(GOLDEN.read_text())["cases"][case]
  logits = _last_logits(w, card.arch, golden["prompt_ids"])
  assert int(np.argmax(logits)) == golden["greedy_ids"][0]
  step = golden["steps"][0]
  np.testing.assert_allclose(logits[step["top_ids"]], step["top_logits"], atol=1e-2, rtol=0)


def test_sha256_mismatch_is_clear():
  card = load_model_card("smollm2-135m")
  if importlib.util.find_spec(card.weights.package) is None:
    pytest.fail(f"{card.weights.package} is not installed (make test installs it)")
  with pytest.raises(ValueError, match="sha256 mismatch"):
    ck.load_checkpoint(_card_with(card, sha256="0" * 64))


def test_missing_package_is_clear():
  card = _card_with(load_model_card("smollm2-135m"), package="no_such_package_fj")
  with pytest.raises(FileNotFoundError, match="no_such_package_fj"):
    ck.load_checkpoint(card)


def test_safetensors_round_trip_smollm2(smollm2, tmp_path):
  card, w = smollm2
  ck.save_safetensors_dir(w, card.arch, tmp_path)
  _assert_same(ck.load_safetensors_dir(tmp_path, card.arch), w)


# ---------------------------------------------------------------- hand-made GGUF files

def test_tiny_gguf_round_trip_f32(tiny, tmp_path):
  import gguf

  card, w = tiny
  path = _write_gguf(tmp_path / "tiny.gguf", w, card.arch, gguf.GGMLQuantizationType.F32)
  _assert_same(ck.load_checkpoint(_card_with(card, format="gguf", path=str(path))), w)


@pytest.mark.parametrize("name,atol", [("F16", 1e-3), ("Q8_0", 4e-3), ("Q4_1", 0.05), ("Q4_0", 0.06)])
def test_tiny_gguf_quantized(tiny, tmp_path, name, atol):
  import gguf

  card, w = tiny
  path = _write_gguf(tmp_path / "tiny.gguf", w, card.arch, gguf.GGMLQuantizationType[name])
  got = ck.load_checkpoint(_card_with(card, format="gguf", path=str(path)))
  _assert_same(got, w, atol=atol)


def test_read_gguf_agrees_with_gguf_reader(tiny, tmp_path):
  import gguf

  card, w = tiny
  path = _write_gguf(tmp_path / "tiny.gguf", w, card.arch, gguf.GGMLQuantizationType.Q4_1)
  mine, theirs = ck.read_gguf(path), gguf.GGUFReader(path)
  assert [t.name for t in theirs.tensors] == list(mine.tensors)
  for t in theirs.tensors:
    m = mine.tensors[t.name]
    assert (m.qtype, m.shape) == (int(t.tensor_type), tuple(int(d) for d in reversed(t.shape)))
    np.testing.assert_array_equal(m.raw.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
  assert mine.metadata["llama.attention.head_count"] == card.arch.n_heads
  assert mine.metadata["tokenizer.ggml.tokens"] == ("array", 8, 3)
  assert ck.read_gguf(path, arrays=True).metadata["tokenizer.ggml.tokens"] == ["a", "bb", "ccc"]


def test_gguf_metadata_mismatch(tiny, tmp_path):
  import gguf

  card, w = tiny
  path = _write_gguf(tmp_path / "tiny.gguf", w, card.arch, gguf.GGMLQuantizationType.F32)
  arch = dataclasses.replace(card.arch, n_heads=8, head_dim=32)
  with pytest.raises(ValueError, match="head_count"):
    ck.load_gguf(path, arch)


def _tensor(qtype_name, block_bytes):
  import gguf

  qt = gguf.GGMLQuantizationType[qtype_name]
  raw = np.frombuffer(block_bytes, np.uint8).reshape(1, -1)
  return ck.GGUFTensor("t", int(qt), (1, 32), raw)


def test_dequantize_hand_made_blocks():
  j = np.arange(16)
  nibbles = (j | ((15 - j) << 4)).astype(np.uint8).tobytes()
  q = np.concatenate([j, 15 - j]).astype(np.float32)
  d, m = np.float16(0.5).tobytes(), np.float16(-1.25).tobytes()
  np.testing.assert_array_equal(ck.dequantize(_tensor("Q4_0", d + nibbles))[0], (q - 8) * 0.5)
  np.testing.assert_array_equal(ck.dequantize(_tensor("Q4_1", d + m + nibbles))[0], q * 0.5 - 1.25)
  q8 = np.arange(-16, 16, dtype=np.int8)
  np.testing.assert_array_equal(ck.dequantize(_tensor("Q8_0", d + q8.tobytes()))[0], q8 * 0.5)


def test_rope_permutation_convention():
  rng = np.random.default_rng(0)
  heads, hd, dim = 3, 8, 12
  w_hf = rng.standard_normal((heads * hd, dim)).astype(np.float32)   # [out, in], rotate-half
  w_gguf = ck.permute_rope_rows(w_hf, heads)
  np.testing.assert_array_equal(ck.unpermute_rope_rows(w_gguf, heads), w_hf)
  x = rng.standard_normal((5, dim)).astype(np.float32)
  hf = _rope_rotate_half((x @ w_hf.T).reshape(5, heads, hd), 1e4)
  ggml = _rope_interleaved((x @ w_gguf.T).reshape(5, heads, hd), 1e4)
  # q.k scores agree: the permutation only reorders dimensions within each head
  np.testing.assert_allclose(np.einsum("thk,shk->hts", hf, hf),
                             np.einsum("thk,shk->hts", ggml, ggml), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- safetensors

def test_safetensors_sharded_round_trip_via_card(tiny, tmp_path):
  card, w = tiny
  ck.save_safetensors_dir(w, card.arch, tmp_path, shard_bytes=400_000)
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  assert (tmp_path / "model.safetensors.index.json").exists()
  got = ck.load_checkpoint(_card_with(card, format="safetensors", path=str(tmp_path)))
  _assert_same(got, w)
  config = json.loads((tmp_path / "config.json").read_text())
  assert ck.architecture_from_hf_config(config) == card.arch


def test_safetensors_bfloat16(tiny, tmp_path):
  import ml_dtypes

  card, w = tiny
  ck.save_safetensors_dir(w, card.arch, tmp_path, dtype="bfloat16")
  got = ck.load_safetensors_dir(tmp_path, card.arch)
  _assert_same(got, {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in w.items()})


def test_safetensors_config_mismatch(tiny, tmp_path):
  card, w = tiny
  ck.save_safetensors_dir(w, card.arch, tmp_path)
  with pytest.raises(ValueError, match="n_kv_heads"):
    ck.load_safetensors_dir(tmp_path, dataclasses.replace(card.arch, n_kv_heads=4))


def test_hf_config_rejects_rope_scaling(tiny):
  config = ck.hf_config_from_architecture(tiny[0].arch)
  config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
  with pytest.raises(ConfigError, match="rope_scaling"):
    ck.architecture_from_hf_config(config)


# ---------------------------------------------------------------- random init and shape checks

def test_random_is_deterministic_and_scaled(tiny):
  card, w = tiny
  again = ck.random_weights(card.arch, seed=card.weights.seed, threads=1)
  _assert_same(again, w)
  other = ck.random_weights(card.arch, seed=card.weights.seed + 1)
  assert not np.array_equal(other["wq"], w["wq"])
  assert np.all(w["attn_norm"] == 1.0) and np.all(w["final_norm"] == 1.0)
  assert abs(w["wq"].std() * np.sqrt(card.arch.dim) - 1) < 0.05
  assert abs(w["w_down"].std() * np.sqrt(card.arch.ffn_dim) - 1) < 0.05
  logits = _last_logits(w, card.arch, [1, 2, 3])
  assert np.isfinite(logits).all() and 0.1 < logits.std() < 10


def test_check_shapes_names_the_tensor(tiny):
  card, w = tiny
  bad = dict(w, wk=w["wk"][:, :, :4])
  with pytest.raises(ValueError, match="'wk'"):
    ck.check_shapes(bad, card.arch)
  with pytest.raises(ValueError, match="lack.*w_up"):
    ck.check_shapes({k: v for k, v in w.items() if k != "w_up"}, card.arch)
  tied = dataclasses.replace(card.arch, tied_embeddings=True)
  with pytest.raises(ValueError, match="lm_head"):
    ck.check_shapes(w, tied)
  with pytest.raises(ValueError, match="dtype"):
    ck.check_shapes(dict(w, embed=w["embed"].astype(np.float16)), card.arch)


def test_unknown_format(tiny):
  with pytest.raises(ValueError, match="orbax"):
    ck.load_checkpoint(_card_with(tiny[0], format="orbax"))
