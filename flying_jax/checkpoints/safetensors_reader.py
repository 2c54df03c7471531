"""Hugging Face checkpoints (a directory of *.safetensors + config.json): read for every family
of `model.families` through its weight table; Llama / Mistral also written.

HF stores Linear weights as [out, in] with Q/K already in rotate-half order, so reading is a
transpose and reshape per tensor (Gemma's norms are stored minus one). Sharded checkpoints are found through
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


def _rope(config: dict, kind: str | None = None) -> dict:
  """RoPE parameters: transformers 5 nests them (per layer type for Gemma 3), older configs
  keep `rope_theta` / `rope_scaling` / `rope_local_base_freq` at the top."""
  params = config.get("rope_parameters") or {}
  if kind is not None and kind in params:
    params = params[kind]
  elif kind is not None and "full_attention" in params:
    params = params["full_attention"]
  out = {"rope_theta": params.get("rope_theta", config.get("rope_theta", 10000.0)),
         "rope_type": params.get("rope_type", "default")}
  if kind == "sliding_attention" and "rope_theta" not in params:
    out["rope_theta"] = config.get("rope_local_base_freq", out["rope_theta"])
  if config.get("rope_scaling"):
    out["rope_type"] = config["rope_scaling"].get("rope_type", "scaled")
  return out


def _windows(config: dict, n_layers: int, context: int) -> dict:
  """sliding_window / sliding_pattern / rope_local_theta from `layer_types` (Gemma 3, Qwen3,
  Mistral); an all-sliding model (Mistral) has pattern 0."""
  window = config.get("sliding_window")
  if window is None or config.get("use_sliding_window") is False or int(window) >= context:
    return {}
  window = int(window)
  types = config.get("layer_types") or ["sliding_attention"] * n_layers
  sliding = [t == "sliding_attention" for t in types]
  if not any(sliding):
    return {}
  if all(sliding):
    pattern = 0
  else:
    pattern = sliding.index(False) + 1
    if any(s != (l % pattern != pattern - 1) for l, s in enumerate(sliding)):
      raise ConfigError(f"config.json: layer_types {types} do not repeat one pattern")
  out = {"sliding_window": window, "sliding_pattern": pattern}
  local = _rope(config, "sliding_attention")["rope_theta"]
  if local != _rope(config, "full_attention")["rope_theta"]:
    out["rope_local_theta"] = float(local)
  return out


def architecture_from_hf_config(config: dict) -> Architecture:
  """An `Architecture` from a Hugging Face `config.json` dictionary (any family of
  `model.families`: Llama, Mistral, Qwen3, Gemma 3)."""
  from flying_jax.model.families import family_for_hf

  try:
    family = family_for_hf(config.get("model_type", "llama"))
  except ValueError as e:
    raise ConfigError(f"config.json: {e}") from None
  if config.get("rope_scaling") or _rope(config)["rope_type"] != "default":
    raise ConfigError(f"config.json: rope_scaling {_rope(config)['rope_type']!r} is not supported")
  if config.get("attention_bias") or config.get("mlp_bias"):
    raise ConfigError("config.json: attention_bias / mlp_bias are not supported")
  for key in ("final_logit_softcapping", "attn_logit_softcapping"):
    if config.get(key):
      raise ConfigError(f"config.json: {key} is not supported")
  act = config.get("hidden_activation") or config.get("hidden_act", "silu")
  want = "gelu_pytorch_tanh" if family == "gemma3" else "silu"
  if act != want:
    raise ConfigError(f"config.json: activation {act!r} is not {want!r} ({family})")
  context = int(config.get("max_position_embeddings", 2048))
  try:
    dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    n_layers = int(config["num_hidden_layers"])
    extra = _windows(config, n_layers, context)
    if family == "gemma3":
      extra["query_pre_attn_scalar"] = float(config.get("query_pre_attn_scalar") or 0.0)
    if family == "mixtral":
      extra["n_experts"] = int(config["num_local_experts"])
      extra["experts_per_token"] = int(config["num_experts_per_tok"])
    return Architecture(
        dim=dim, n_layers=n_layers, n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or dim // heads),
        ffn_dim=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
        rope_theta=float(_rope(config, "full_attention")["rope_theta"]),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tied_embeddings=bool(config.get("tie_word_embeddings", family == "gemma3")),
        max_context=context, family=family, **extra)
  except KeyError as e:
    raise ConfigError(f"config.json: missing {e}") from None


def hf_config_from_architecture(arch: Architecture, dtype: str = "float32") -> dict:
  """The Hugging Face `config.json` dictionary of a Llama / Mistral with `arch` (inverse of the
  above; checkpoints this project writes)."""
  a = arch
  if a.family not in ("llama", "mistral") or a.sliding_window:
    raise ValueError(f"writing {a.family} checkpoints is not supported (llama, mistral)")
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
  """A Hugging Face safetensors directory's tensors one at a time (the family's weight table,
  `model.tables`), in their stored dtype, in canonical orientation (see `loader`)."""
  from flying_jax.model.tables import EXPERTS, layer_specs, top_specs

  path = Path(path).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"safetensors checkpoint directory {path} does not exist")
  check_hf_config(path, arch)
  tensors = _Tensors(path)

  def read(spec, layer):
    if spec.per_expert:                                 # one tensor per expert, stacked
      w = np.stack([tensors.get(spec.hf.format(i=layer, k=k), spec.stored_shape(arch))
                    for k in range(arch.n_experts)])
    elif spec.role in EXPERTS:
      w = tensors.get(spec.hf.format(i=layer), (arch.n_experts,) + spec.stored_shape(arch))
    else:
      w = tensors.get(spec.hf.format(i=layer), spec.stored_shape(arch))
    if spec.hf_offset:
      w = w.astype(np.float32) + np.float32(spec.hf_offset)
    return Tensor(spec.name, layer, spec.to_canonical(w, arch))

  for spec in top_specs(arch):
    yield read(spec, None)
  for i in range(arch.n_layers):
    for spec in layer_specs(arch):
      yield read(spec, i)


def load_safetensors_dir(path: str | Path, arch: Architecture) -> dict[str, np.ndarray]:
  """Canonical float32 weights from a Hugging Face Llama safetensors directory."""
  return stack(iter_safetensors_dir(path, arch), arch)


def _hf_tensors(weights: dict[str, np.ndarray], arch: Architecture, layer: int | None) -> dict:
  """HF-named [out, in] tensors: the top-level ones (`layer=None`) or those of one layer."""
  from flying_jax.model.tables import layer_specs, top_specs

  specs = top_specs(arch) if layer is None else layer_specs(arch)
  return dict(hf_tensor(s.name, layer, weights[s.name] if layer is None else weights[s.name][layer],
                        arch) for s in specs)


def hf_tensor(key: str, layer: int | None, w: np.ndarray, arch: Architecture):
  """(Hugging Face name, [out, in] array) of one canonical tensor (one layer's slice)."""
  from flying_jax.model.tables import spec_of

  spec = spec_of(arch, key)
  w = spec.to_stored(w, arch)
  return spec.hf.format(i=layer), (w - np.float32(spec.hf_offset) if spec.hf_offset else w)


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
