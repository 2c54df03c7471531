"""Model families, found by the name a model card gives (`[architecture] family = "llama"`).

A family is the per-device forward (`embed`, `layer`, `logits`, run under `per_device` by the
program registry) and the names checkpoints give it: Hugging Face `model_type`s and GGUF
`general.architecture` values. Programs look a family up here; nothing else imports a model
module directly. Mistral is Llama's forward (grouped-query attention, SwiGLU, RMSNorm, rotate-half
RoPE) when its sliding window does not bind.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  module: str                      # defines embed(embed_VxD, meta), layer(...), logits(...)
  hf_model_types: tuple[str, ...]  # config.json "model_type" values it reads
  gguf_architectures: tuple[str, ...]

  @property
  def forward(self) -> ModuleType:
    """The per-device forward functions (imported on first use: cards parse without JAX)."""
    return importlib.import_module(self.module)


def _families() -> dict[str, Family]:
  return {
      "llama": Family("llama", "flying_jax.model.llama", ("llama",), ("llama",)),
      "mistral": Family("mistral", "flying_jax.model.llama", ("mistral",), ("llama",)),
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
