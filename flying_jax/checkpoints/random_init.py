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

from flying_jax.checkpoints.loader import Tensor, expected_shapes, stack
from flying_jax.config import Architecture


def fan_in(name: str, arch: Architecture) -> int:
  """The input width each canonical matrix contracts over (embeddings: the model width)."""
  from flying_jax.model.tables import spec_of

  role = spec_of(arch, name).role
  if role == "o":
    return arch.n_heads * arch.head_dim
  if role in ("ffn_out", "exp_out"):
    return arch.ffn_dim
  return arch.dim


def iter_random(arch: Architecture, seed: int = 0) -> Iterator[Tensor]:
  """`arch`'s random weights one tensor at a time, as arrays on the default device."""
  from flying_jax.model.tables import layer_specs, top_specs

  for spec in top_specs(arch):
    yield Tensor(spec.name, None, _one(spec, None, seed, arch))
  for layer in range(arch.n_layers):
    for spec in layer_specs(arch):
      yield Tensor(spec.name, layer, _one(spec, layer, seed, arch))


def random_weights(arch: Architecture, seed: int = 0, threads: int | None = None
                   ) -> dict[str, np.ndarray]:
  """Canonical float32 weights for `arch` on the host, the same for the same `seed` everywhere
  (`threads` is accepted for compatibility; generation runs on the device)."""
  return stack(iter_random(arch, seed), arch)


def _one(spec, layer: int | None, seed: int, arch: Architecture):
  name, shape = spec.name, spec.canonical_shape(arch)
  if spec.role in ("norm", "head_norm"):
    return jnp.ones(shape, jnp.float32)
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
  key = jax.random.fold_in(key, 0 if layer is None else layer + 1)
  return _normal(key, shape, 1.0 / math.sqrt(fan_in(name, arch)))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape: tuple[int, ...], scale: float):
  return jax.random.normal(key, shape, jnp.float32) * jnp.float32(scale)
