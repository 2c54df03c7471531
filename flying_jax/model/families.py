"""Model families, found by the name a model card gives (`[architecture] family = "llama"`).

A family is a flax nnx module defining its decoder `Layer` from the shared layers
(`model.layers`; `model.decoder` assembles the whole model), its weight table (`model.tables`: every tensor, its role and its checkpoint
names) and the names checkpoints give the family: Hugging Face `model_type`s and GGUF
`general.architecture` values. Programs look a family up here; nothing else imports a model
module directly.

- llama: grouped-query attention, SwiGLU, RMSNorm, rotate-half RoPE.
- mistral: Llama's forward; a sliding window (every layer) is masked exactly when it binds.
- qwen3: Llama with per-head RMSNorms on q and k before RoPE.
- mixtral: Llama's attention; a top-k mixture of SwiGLU experts, each split by FFN columns over
  the group like the dense FFN (`model.moe`).
- gemma3: q/k norms, a norm after attention and after the FFN, GeGLU (tanh), embeddings scaled
  by sqrt(dim), sliding-window layers with their own RoPE base, and global ones.

Adding a family: a weight table in `model.tables` (with each parameter's module path), a module
defining `Layer` and `EMBED_SCALE` (or an existing one), and an entry below.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Callable

from flying_jax.model import tables


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  module: str                      # defines `Layer` (an nnx module) and `EMBED_SCALE`
  hf_model_types: tuple[str, ...]  # config.json "model_type" values it reads
  gguf_architectures: tuple[str, ...]
  table: Callable[[], tuple]       # its weight table (`model.tables`)
  gguf_rope_permuted: bool = True  # llama.cpp permutes Q/K rows for interleaved RoPE

  @property
  def forward(self) -> ModuleType:
    """The family's module: `Layer` and `EMBED_SCALE` (imported on first use: cards parse
    without JAX)."""
    return importlib.import_module(self.module)


def _families() -> dict[str, Family]:
  return {
      "llama": Family("llama", "flying_jax.model.llama", ("llama",), ("llama",), tables.llama),
      "mistral": Family("mistral", "flying_jax.model.llama", ("mistral",), ("llama",),
                        tables.llama),
      "qwen3": Family("qwen3", "flying_jax.model.llama", ("qwen3",), ("qwen3",), tables.qwen3,
                      gguf_rope_permuted=False),
      "mixtral": Family("mixtral", "flying_jax.model.llama", ("mixtral",), ("llama",),
                        tables.mixtral),
      "gemma3": Family("gemma3", "flying_jax.model.gemma3", ("gemma3_text", "gemma3"),
                       ("gemma3",), tables.gemma3, gguf_rope_permuted=False),
  }


def names() -> list[str]:
  return sorted(_families())


def family_of(name: str) -> Family:
  """The family called `name`; ValueError names the known ones."""
  fams = _families()
  if name not in fams:
    raise ValueError(f"model family {name!r} is not supported; known: {', '.join(sorted(fams))}")
  return fams[name]


def family_for_hf(model_type: str) -> str:
  """The family that reads a Hugging Face `model_type`; ValueError if none does."""
  for fam in _families().values():
    if model_type in fam.hf_model_types:
      return fam.name
  known = sorted(t for f in _families().values() for t in f.hf_model_types)
  raise ValueError(f"model_type {model_type!r} is not supported (known: {', '.join(known)})")
