"""Deterministic random weights in the canonical layout, scaled like a real initialization, made
on a device with `jax.random`.

Each tensor (each layer's slice of a per-layer one) draws from its own key, folded from (seed,
name, layer): values do not depend on the order of generation, and threefry gives the same values
on every machine and backend. Matrices are normal with std 1/sqrt(fan_in); norms are 1.0.
`iter_random` yields them one at a time as device arrays (the engine converts and places each
where it was made, nothing passes through the host); `random_weights` gathers them on the host.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from flying_jax.checkpoints.loader import NORMS, Tensor, expected_shapes, stack
from flying_jax.config import Architecture

_TOP = ("embed", "lm_head", "final_norm")


def fan_in(name: str, arch: Architecture) -> int:
  """The input width each canonical matrix contracts over (embeddings: the model width)."""
  if name == "wo":
    return arch.n_heads * arch.head_dim
  if name == "w_down":
    return arch.ffn_dim
  return arch.dim


def iter_random(arch: Architecture, seed: int = 0) -> Iterator[Tensor]:
  """`arch`'s random weights one tensor at a time, as arrays on the default device."""
  shapes = expected_shapes(arch)
  for name in _TOP:
    if name in shapes:
      yield Tensor(name, None, _one(name, shapes[name], None, seed, arch))
  per_layer = [n for n in shapes if n not in _TOP]
  for layer in range(arch.n_layers):
    for name in per_layer:
      yield Tensor(name, layer, _one(name, shapes[name][1:], layer, seed, arch))


def random_weights(arch: Architecture, seed: int = 0, threads: int | None = None
                   ) -> dict[str, np.ndarray]:
  """Canonical float32 weights for `arch` on the host, the same for the same `seed` everywhere
  (`threads` is accepted for compatibility; generation runs on the device)."""
  return stack(iter_random(arch, seed), arch)


def _one(name: str, shape: tuple[int, ...], layer: int | None, seed: int, arch: Architecture):
  if name in NORMS:
    return jnp.ones(shape, jnp.float32)
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
  key = jax.random.fold_in(key, 0 if layer is None else layer + 1)
  return _normal(key, shape, 1.0 / math.sqrt(fan_in(name, arch)))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape: tuple[int, ...], scale: float):
  return jax.random.normal(key, shape, jnp.float32) * jnp.float32(scale)
