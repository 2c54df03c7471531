"""Load a model card's weights, one tensor at a time or into the canonical float32 layout.

Canonical layout (numpy float32, `x @ W` orientation, Hugging Face rotate-half RoPE order):

  embed [V, D], lm_head [V, D] (only when embeddings are not tied), final_norm [D],
  attn_norm [L, D], wq [L, D, Hq, hd], wk [L, D, Hkv, hd], wv [L, D, Hkv, hd], wo [L, Hq, hd, D],
  ffn_norm [L, D], w_gate [L, D, F], w_up [L, D, F], w_down [L, F, D], and the family's other
  tensors (q_norm / k_norm [L, hd], ...): the names and shapes come from `model.tables`.

`iter_tensors` streams a card's weights as `Tensor`s: one layer's slice of one canonical name at
a time (no leading L axis), in the dtype the reader decodes to (float32 for quantized GGUF, the
stored dtype for safetensors), so a loader holds one tensor on the host at a time.
`load_checkpoint` stacks them into the whole canonical float32 dictionary (tests, conversion).
The readers import the shape helpers from here; this module imports the readers only inside its
functions, so there is no import cycle.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from flying_jax.config import Architecture, ModelCard


def expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
  """The canonical name -> shape table for `arch` (its family's `model.tables` entries;
  per-layer tensors with a leading L axis; `lm_head` only when not tied)."""
  from flying_jax.model.tables import table

  return {s.name: ((arch.n_layers,) if s.per_layer else ()) + s.canonical_shape(arch)
          for s in table(arch)}


def check_shapes(weights: dict[str, np.ndarray], arch: Architecture) -> None:
  """Raise ValueError naming the tensor if `weights` is not exactly the canonical set for `arch`."""
  shapes = expected_shapes(arch)
  missing = sorted(set(shapes) - set(weights))
  extra = sorted(set(weights) - set(shapes))
  if missing:
    raise ValueError(f"weights lack tensor(s) {missing}")
  if extra:
    hint = " (the card says tied_embeddings = true)" if "lm_head" in extra else ""
    raise ValueError(f"weights have unexpected tensor(s) {extra}{hint}")
  for name, shape in shapes.items():
    got = tuple(weights[name].shape)
    if got != shape:
      raise ValueError(f"tensor {name!r} has shape {got}, expected {shape}")
    if weights[name].dtype != np.float32:
      raise ValueError(f"tensor {name!r} has dtype {weights[name].dtype}, expected float32")


def expect_shape(name: str, array: np.ndarray, shape: tuple[int, ...], where: str = "") -> np.ndarray:
  """Return `array` if it has `shape`, else raise ValueError naming the source tensor."""
  if tuple(array.shape) != tuple(shape):
    place = f" in {where}" if where else ""
    raise ValueError(f"tensor {name!r}{place} has shape {tuple(array.shape)}, expected {tuple(shape)}")
  return array


class Tensor(NamedTuple):
  """One canonical tensor, or one layer's slice of a per-layer one (`layer` None: top level)."""
  name: str
  layer: int | None
  array: np.ndarray


def iter_tensors(card: ModelCard) -> Iterator[Tensor]:
  """`card`'s weights one tensor at a time, read from GGUF, safetensors, or made at random."""
  fmt = card.weights.format
  if fmt == "gguf":
    from flying_jax.checkpoints.gguf_reader import iter_gguf, resolve_gguf_path
    return iter_gguf(resolve_gguf_path(card.weights), card.arch)
  if fmt == "safetensors":
    from flying_jax.checkpoints.safetensors_reader import iter_safetensors_dir
    if not card.weights.path:
      raise ValueError(f"model {card.name}: safetensors weights need `path` (a directory)")
    return iter_safetensors_dir(card.weights.path, card.arch)
  if fmt == "random":
    from flying_jax.checkpoints.random_init import iter_random
    return iter_random(card.arch, card.weights.seed)
  raise ValueError(f"model {card.name}: weights format {fmt!r} cannot be read tensor by tensor"
                   " (known: gguf, safetensors, random)")


def stack(tensors: Iterable[Tensor], arch: Architecture) -> dict[str, np.ndarray]:
  """The canonical float32 dictionary (per-layer names stacked on a leading L axis)."""
  shapes = expected_shapes(arch)
  out: dict[str, np.ndarray] = {}
  for t in tensors:
    if t.name not in shapes:
      hint = " (the card says tied_embeddings = true)" if t.name == "lm_head" else ""
      raise ValueError(f"weights have unexpected tensor {t.name!r}{hint}")
    if t.layer is None:
      out[t.name] = np.asarray(t.array, np.float32)
    else:
      if t.name not in out:
        out[t.name] = np.empty(shapes[t.name], np.float32)
      out[t.name][t.layer] = expect_shape(t.name, t.array, shapes[t.name][1:])
  return out


def load_checkpoint(card: ModelCard) -> dict[str, np.ndarray]:
  """The canonical float32 weights of `card`, read from GGUF, safetensors, or made at random."""
  weights = stack(iter_tensors(card), card.arch)
  check_shapes(weights, card.arch)
  return weights


def prefetch(jobs: Iterable[Callable[[], Tensor]], depth: int = 2) -> Iterator[Tensor]:
  """Run `jobs` (each makes one tensor) on `depth` threads, yielding results in order with at
  most `depth` made ahead: readers decode in parallel and memory stays bounded."""
  if depth <= 1:
    for job in jobs:
      yield job()
    return
  with ThreadPoolExecutor(depth) as pool:
    pending: deque = deque()
    for job in jobs:
      pending.append(pool.submit(job))
      if len(pending) >= depth:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
