"""Hugging Face Llama / Mistral checkpoints (a directory of *.safetensors + config.json), both ways.

HF stores Linear weights as [out, in] with Q/K already in rotate-half order, so reading is a
transpose and reshape per tensor. Sharded checkpoints are found through
`model.safetensors.index.json`; bf16 tensors are read through `ml_dtypes` and widened to float32.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from flying_jax.checkpoints.loader import Tensor, expect_shape, expected_shapes, stack
from flying_jax.config import Architecture, ConfigError

INDEX = "model.safetensors.index.json"
_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_PROJ = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
         "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
         "w_down": "mlp.down_proj"}


def architecture_from_hf_config(config: dict) -> Architecture:
  """An `Architecture` from a Hugging Face `config.json` dictionary (Llama or Mistral)."""
  from flying_jax.model.families import family_for_hf

  try:
    family = family_for_hf(config.get("model_type", "llama"))
  except ValueError as e:
    raise ConfigError(f"config.json: {e}") from None
  if config.get("rope_scaling"):
    raise ConfigError(f"config.json: rope_scaling {config['rope_scaling']} is not supported")
  if config.get("attention_bias") or config.get("mlp_bias"):
    raise ConfigError("config.json: attention_bias / mlp_bias are not supported")
  context = int(config.get("max_position_embeddings", 2048))
  window = config.get("sliding_window")
  if window is not None and int(window) < context:
    raise ConfigError(f"config.json: a sliding window of {window} tokens (below the context of "
                      f"{context}) is not supported yet")
  try:
    dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    return Architecture(
        dim=dim, n_layers=int(config["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or dim // heads),
        ffn_dim=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_context=context, family=family)
  except KeyError as e:
    raise ConfigError(f"config.json: missing {e}") from None


def hf_config_from_architecture(arch: Architecture, dtype: str = "float32") -> dict:
  """The Hugging Face `config.json` dictionary of a Llama / Mistral with `arch` (inverse of the
  above)."""
  a = arch
  head = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[a.family]
  extra = {"sliding_window": None} if a.family == "mistral" else {}
  return {
      **extra, "architectures": [head], "model_type": a.family, "hidden_act": "silu",
      "hidden_size": a.dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
      "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim, "intermediate_size": a.ffn_dim,
      "vocab_size": a.vocab_size, "rope_theta": a.rope_theta, "rms_norm_eps": a.norm_eps,
      "tie_word_embeddings": a.tied_embeddings, "max_position_embeddings": a.max_context,
      "attention_bias": False, "mlp_bias": False, "rope_scaling": None, "torch_dtype": dtype,
  }


def _hf_layout(arch: Architecture) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Canonical per-layer key -> (HF suffix, HF shape) for one layer."""
  a = arch
  q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
  shapes = {"wq": (q, a.dim), "wk": (kv, a.dim), "wv": (kv, a.dim), "wo": (a.dim, q),
            "w_gate": (a.ffn_dim, a.dim), "w_up": (a.ffn_dim, a.dim), "w_down": (a.dim, a.ffn_dim)}
  layout = {k: (f"{v}.weight", shapes[k]) for k, v in _PROJ.items()}
  layout.update({k: (f"{v}.weight", (a.dim,)) for k, v in _NORMS.items()})
  return layout


def _top_names(arch: Architecture) -> dict[str, str]:
  names = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
  if not arch.tied_embeddings:
    names["lm_head"] = "lm_head.weight"
  return names


class _Tensors:
  """Name -> file lookup over a possibly sharded safetensors directory, reading one tensor at a
  time in its stored dtype (bfloat16 through ml_dtypes)."""

  def __init__(self, path: Path):
    import ml_dtypes  # noqa: F401  registers bfloat16 with numpy so safetensors can return it
    from safetensors import safe_open

    index = path / INDEX
    if index.exists():
      files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
      files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
      raise FileNotFoundError(f"no *.safetensors files in {path}")
    self.path, self.handles = path, [safe_open(str(path / f), framework="numpy") for f in files]
    self.where = {name: h for h in self.handles for name in h.keys()}

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self.where:
      raise ValueError(f"safetensors checkpoint {self.path} lacks tensor {name!r}")
    return expect_shape(name, self.where[name].get_tensor(name), shape, str(self.path))


def check_hf_config(path: Path, arch: Architecture) -> None:
  """Raise ValueError when `path/config.json` (if any) disagrees with `arch` on shapes or heads."""
  config_file = path / "config.json"
  if not config_file.exists():
    return
  found = architecture_from_hf_config(json.loads(config_file.read_text()))
  for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size",
                "tied_embeddings"):
    if getattr(found, field) != getattr(arch, field):
      raise ValueError(f"{config_file}: {field} = {getattr(found, field)} but the model card says "
                       f"{getattr(arch, field)}")


def iter_safetensors_dir(path: str | Path, arch: Architecture) -> Iterator[Tensor]:
  """A Hugging Face Llama safetensors directory's tensors one at a time, in their stored dtype,
  in canonical orientation (see `loader`)."""
  path = Path(path).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"safetensors checkpoint directory {path} does not exist")
  check_hf_config(path, arch)
  tensors, shapes = _Tensors(path), expected_shapes(arch)
  for k, name in _top_names(arch).items():
    yield Tensor(k, None, tensors.get(name, shapes[k]))
  layout = _hf_layout(arch)
  for i in range(arch.n_layers):
    for key, (suffix, hf_shape) in layout.items():
      w = tensors.get(f"model.layers.{i}.{suffix}", hf_shape)
      yield Tensor(key, i, w if key in _NORMS else w.T.reshape(shapes[key][1:]))


def load_safetensors_dir(path: str | Path, arch: Architecture) -> dict[str, np.ndarray]:
  """Canonical float32 weights from a Hugging Face Llama safetensors directory."""
  return stack(iter_safetensors_dir(path, arch), arch)


def _hf_tensors(weights: dict[str, np.ndarray], arch: Architecture, layer: int | None) -> dict:
  """HF-named [out, in] tensors: the top-level ones (`layer=None`) or those of one layer."""
  if layer is None:
    return {name: weights[k] for k, name in _top_names(arch).items()}
  return dict(hf_tensor(key, layer, weights[key][layer], arch) for key in _hf_layout(arch))


def hf_tensor(key: str, layer: int | None, w: np.ndarray, arch: Architecture):
  """(Hugging Face name, [out, in] array) of one canonical tensor (one layer's slice)."""
  if layer is None:
    return _top_names(arch)[key], w
  suffix, hf_shape = _hf_layout(arch)[key]
  return f"model.layers.{layer}.{suffix}", w if key in _NORMS else w.reshape(-1, hf_shape[0]).T


def write_safetensors_stream(tensors, arch: Architecture, path: str | Path,
                             dtype: str = "bfloat16") -> Path:
  """Write a stream of canonical `Tensor`s as a sharded Hugging Face checkpoint, one file per
  layer (plus one for the top-level tensors), holding one layer on the host at a time."""
  import ml_dtypes
  from safetensors.numpy import save_file

  np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
  path = Path(path).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  n = arch.n_layers + 1
  name_of = lambda unit: f"model-{unit + 1:05d}-of-{n:05d}.safetensors"
  weight_map, unit, group = {}, 0, {}

  def flush():
    save_file(group, str(path / name_of(unit)), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(group, name_of(unit)))

  for t in tensors:
    u = 0 if t.layer is None else t.layer + 1
    if u != unit:
      flush()
      unit, group = u, {}
    name, w = hf_tensor(t.name, t.layer, t.array, arch)
    group[name] = np.ascontiguousarray(w, dtype=np_dtype)
  flush()
  (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
  (path / "config.json").write_text(json.dumps(hf_config_from_architecture(arch, dtype), indent=1))
  return path


def save_safetensors_dir(weights: dict[str, np.ndarray], arch: Architecture, path: str | Path,
                         dtype: str = "float32", shard_bytes: int | None = None) -> Path:
  """Write canonical `weights` as a Hugging Face Llama checkpoint (config.json + safetensors).

  `dtype` is "float32", "float16" or "bfloat16". With `shard_bytes`, files are split at layer
  boundaries into model-0000i-of-0000n.safetensors plus model.safetensors.index.json.
  """
  import ml_dtypes
  from safetensors.numpy import save_file

  np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
  path = Path(path).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  groups = _shard_groups(arch, weights, shard_bytes)
  names = ["model.safetensors"] if len(groups) == 1 else [
      f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
  weight_map = {}
  for name, group in zip(names, groups):
    tensors = {}
    for layer in group:
      tensors.update(_hf_tensors(weights, arch, layer))
    save_file({k: np.ascontiguousarray(v, dtype=np_dtype) for k, v in tensors.items()},
              str(path / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))
  if len(names) > 1:
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
  (path / "config.json").write_text(json.dumps(hf_config_from_architecture(arch, dtype), indent=1))
  return path


def _shard_groups(arch: Architecture, weights: dict, shard_bytes: int | None) -> list[list]:
  """Layers (None = top-level tensors) grouped into shards of at most ~`shard_bytes` float32 bytes."""
  units = [None, *range(arch.n_layers)]
  if not shard_bytes:
    return [units]
  groups, size = [[]], 0
  for unit in units:
    unit_bytes = sum(v.size * 4 for v in _hf_tensors(weights, arch, unit).values())
    if groups[-1] and size + unit_bytes > shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(unit)
    size += unit_bytes
  return groups
