"""Deterministic random weights in the canonical layout, scaled like a real initialization.

Every layer of a stacked tensor (and every 4096-row chunk of an embedding) draws from its own
stream keyed by (seed, name, chunk): values do not depend on generation order; chunks fill in parallel.
Matrices are normal with std 1/sqrt(fan_in); norms are 1.0.
"""

from __future__ import annotations

import math
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flying_jax.checkpoints.loader import NORMS, expected_shapes
from flying_jax.config import Architecture


def fan_in(name: str, arch: Architecture) -> int:
  """The input width each canonical matrix contracts over (embeddings: the model width)."""
  if name == "wo":
    return arch.n_heads * arch.head_dim
  if name == "w_down":
    return arch.ffn_dim
  return arch.dim


def random_weights(arch: Architecture, seed: int = 0,
                   threads: int | None = None) -> dict[str, np.ndarray]:
  """Canonical float32 weights for `arch`, the same for the same `seed` on every machine."""
  shapes = expected_shapes(arch)
  out = {name: _init(name, shape) for name, shape in shapes.items()}
  jobs = [(name, chunk) for name, shape in shapes.items() if name not in NORMS
          for chunk in range(-(-shape[0] // _rows_per_chunk(name)))]

  def fill(job: tuple[str, int]) -> None:
    name, chunk = job
    rows = _rows_per_chunk(name)
    target = out[name][chunk * rows:(chunk + 1) * rows]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), chunk])
    rng.standard_normal(out=target, dtype=np.float32)
    target *= np.float32(1.0 / math.sqrt(fan_in(name, arch)))

  with ThreadPoolExecutor(max_workers=threads) as pool:
    list(pool.map(fill, jobs))
  return out


def _rows_per_chunk(name: str) -> int:
  """Stacked per-layer tensors draw one layer per stream; embeddings 4096 vocabulary rows."""
  return 4096 if name in ("embed", "lm_head") else 1


def _init(name: str, shape: tuple[int, ...]) -> np.ndarray:
  return np.ones(shape, np.float32) if name in NORMS else np.empty(shape, np.float32)
