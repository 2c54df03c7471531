"""Frozen configuration values parsed once at the edge: model cards and mesh presets.

Model cards live in `models/*.toml`, mesh presets in `meshes/*.toml` at the top of the repository
and ship inside the package. A name (`"smollm2-135m"`) is looked up in the user's folders, the
current directory, a checkout, then the shipped copies (`flying_jax.presets`); a path to a
`.toml` file is read as is.
"""

from __future__ import annotations

import dataclasses
import tomllib

from flying_jax import presets


class ConfigError(ValueError):
  """A model card or mesh preset is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class Architecture:
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  vocab_size: int
  rope_theta: float
  norm_eps: float
  tied_embeddings: bool
  max_context: int
  family: str = "llama"            # the model family (`flying_jax.model.families`)
  sliding_window: int = 0          # keys a sliding-window layer sees, itself included (0: none)
  sliding_pattern: int = 0         # layer l is global iff l % p == p - 1 (0: every layer slides)
  rope_local_theta: float = 0.0    # RoPE base of the sliding layers (0: rope_theta)
  query_pre_attn_scalar: float = 0.0  # scores scale by its -1/2 power (0: head_dim)
  n_experts: int = 0               # a mixture of experts in place of the FFN (0: dense)
  experts_per_token: int = 0       # experts each token is routed to (top-k)

  def __post_init__(self):
    from flying_jax.model.families import names   # no JAX: a table of names
    if self.family not in names():
      raise ConfigError(f"model family {self.family!r} is not supported; known: "
                        f"{', '.join(names())}")
    if self.sliding_window < 0 or self.sliding_pattern < 0:
      raise ConfigError("sliding_window and sliding_pattern must not be negative")
    if self.n_experts and not 0 < self.experts_per_token <= self.n_experts:
      raise ConfigError(f"experts_per_token={self.experts_per_token} must be in 1..n_experts")
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

  def sliding(self, layer: int) -> bool:
    """Whether `layer` attends to a sliding window of the last `sliding_window` keys."""
    p = self.sliding_pattern
    return self.sliding_window > 0 and (p == 0 or layer % p != p - 1)

  @property
  def all_sliding(self) -> bool:
    """Whether every layer slides: then KV pages wholly before a sequence's window are never read
    again and can be freed while it runs (Gemma 3's global layers keep every token)."""
    return self.sliding_window > 0 and all(self.sliding(l) for l in range(self.n_layers))

  @property
  def hybrid(self) -> bool:
    """Whether some layers slide and some do not (Gemma 3): the sliding layers never read keys
    more than a window back, so their KV can live in pools of their own that hold a window per
    sequence (`kv.window`), while the global layers keep every token."""
    return self.sliding_window > 0 and not self.all_sliding and any(
        self.sliding(l) for l in range(self.n_layers))

  def layer_rope_theta(self, layer: int) -> float:
    return self.rope_local_theta if self.sliding(layer) and self.rope_local_theta else self.rope_theta

  @property
  def attn_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def group_size(self) -> int:
    """Query heads per KV head (grouped-query attention)."""
    return self.n_heads // self.n_kv_heads

  def param_count(self) -> int:
    a = self
    attn = a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim
    ffn = 3 * a.dim * a.ffn_dim * max(1, a.n_experts) + a.dim * a.n_experts
    emb = a.vocab_size * a.dim * (1 if a.tied_embeddings else 2)
    return a.n_layers * (attn + ffn + 2 * a.dim) + emb + a.dim


@dataclasses.dataclass(frozen=True)
class WeightsSource:
  format: str                      # gguf | safetensors | orbax | random
  path: str | None = None          # a file or directory
  package: str | None = None       # an installed package that ships the file
  file: str | None = None          # file name inside `package` (or of the file `parts` make)
  parts: tuple[str, ...] = ()      # "package:path" pieces of one file, concatenated once into a
  # ^ cache folder ($FLYING_JAX_CACHE, default ~/.cache/flying-jax) and checked against sha256
  sha256: str | None = None
  seed: int = 0                    # for format = "random"


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  kind: str                        # gguf | sentencepiece | tokenizer.json | bytes
  path: str | None = None          # the .model / tokenizer.json / GGUF file (a GGUF: default the
  # ^ weights' file; set it when the weights are an orbax checkpoint)
  chat_template: str | None = None  # chatml | None
  stop_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelCard:
  name: str
  description: str
  arch: Architecture
  weights: WeightsSource
  tokenizer: TokenizerSpec


@dataclasses.dataclass(frozen=True)
class MeshPreset:
  name: str
  platform: str                    # cpu | gpu | tpu
  devices: int
  base_width: int
  widths: tuple[int, ...]
  dtype: str
  decode_buckets: tuple[int, ...]
  prefill_chunks: tuple[int, ...]
  token_budget: int
  page_tokens: int
  pages_per_device: int
  attention_block_tokens: int
  prefill_rows: tuple[int, ...] = (1,)   # a prefill chunk of C tokens may also run as R rows of C/R
  partitions: tuple[str, ...] = ()       # mixed partitions allowed besides the uniform ones
  hosts: int = 1                         # processes the devices are spread over, devices / hosts
  #                                        each: widths up to that keep a group within a host,
  #                                        wider ones merge TP groups across hosts

  @property
  def host_devices(self) -> int:
    return self.devices // self.hosts

  def __post_init__(self):
    if self.hosts < 1 or self.devices % self.hosts:
      raise ConfigError(f"mesh {self.name}: hosts {self.hosts} must divide the {self.devices} "
                        f"devices")
    t = self.base_width
    if t < 1 or t & (t - 1) or self.devices % t:
      raise ConfigError(f"mesh {self.name}: base_width {t} must be a power of two dividing "
                        f"{self.devices}")
    for w in self.widths:
      if w < 1 or w & (w - 1) or self.devices % w:
        raise ConfigError(f"mesh {self.name}: width {w} must be a power of two dividing {self.devices}")
      if w % t:
        raise ConfigError(f"mesh {self.name}: width {w} is narrower than or not a multiple of "
                          f"the base width {t} (an engine of {t} devices holds one copy of the "
                          f"weights)")
    if not self.decode_buckets or not self.prefill_chunks:
      raise ConfigError(f"mesh {self.name}: decode_buckets and prefill_chunks must not be empty")
    if 1 not in self.prefill_rows:
      raise ConfigError(f"mesh {self.name}: prefill_rows must include 1")
    from flying_jax.parallel.partitions import Partition, PartitionError
    for spec in self.partitions:
      try:
        part = Partition.parse(spec, self.devices)
      except PartitionError as e:
        raise ConfigError(f"mesh {self.name}: partition {spec!r}: {e}") from None
      if not set(part.widths) <= set(self.widths):
        raise ConfigError(f"mesh {self.name}: partition {spec!r} uses widths outside {self.widths}")


def find(kind: str, name: str) -> presets.Source:
  """The file a model card (`kind="models"`), mesh preset (`"meshes"`) or hardware preset
  (`"hardware"`) name resolves to; ConfigError names what is known when nothing matches."""
  source = presets.find(kind, name)
  if source is not None:
    return source
  if name.endswith(".toml"):
    raise ConfigError(f"{kind} file {name} does not exist")
  known = ", ".join(available(kind)) or "none"
  what = {"models": "model", "meshes": "mesh preset", "hardware": "hardware"}[kind]
  raise ConfigError(f"unknown {what} {name!r}; known: {known}")


def available(kind: str) -> list[str]:
  """Names of the model cards (`kind="models"`), mesh presets (`"meshes"`) or hardware presets
  (`"hardware"`) found (see `flying_jax.presets`)."""
  return [s.name for s in presets.entries(kind)]


def _fields(cls, table: dict, where: str):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(table) - names
  if unknown:
    raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
  try:
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})
  except TypeError as e:
    raise ConfigError(f"{where}: {e}") from None


def load_model_card(name: str) -> ModelCard:
  source = find("models", name)
  path, raw = source.where, tomllib.loads(source.read_text())
  try:
    return ModelCard(
        name=raw["name"],
        description=raw.get("description", ""),
        arch=_fields(Architecture, raw["architecture"], f"{path} [architecture]"),
        weights=_fields(WeightsSource, raw["weights"], f"{path} [weights]"),
        tokenizer=_fields(TokenizerSpec, raw["tokenizer"], f"{path} [tokenizer]"),
    )
  except KeyError as e:
    raise ConfigError(f"{path}: missing {e}") from None


def load_mesh_preset(name: str) -> MeshPreset:
  source = find("meshes", name)
  path, raw = source.where, tomllib.loads(source.read_text())
  flat = {k: v for k, v in raw.items() if not isinstance(v, dict)}
  for table in ("batching", "kv"):
    flat.update(raw.get(table, {}))
  return _fields(MeshPreset, flat, str(path))


def default_mesh_name() -> str:
  """`cpu-8` when no accelerator is present, else the 1- or 8-chip preset of the platform
  (a Colab TPU has one chip)."""
  import jax  # local: nothing touches JAX at import time

  platform = jax.default_backend()
  if platform == "cpu":
    return "cpu-8" if jax.device_count() >= 8 else "cpu-1"
  n = jax.device_count()
  if platform == "tpu":
    return "tpu-v5e-8" if n >= 8 else "tpu-1"
  return "gpu-8" if n >= 8 else "gpu-1"
