"""Load a model card's weights into the canonical float32 layout, and check their shapes.

Canonical layout (numpy float32, `x @ W` orientation, Hugging Face rotate-half RoPE order):

  embed [V, D], lm_head [V, D] (only when embeddings are not tied), final_norm [D],
  attn_norm [L, D], wq [L, D, Hq, hd], wk [L, D, Hkv, hd], wv [L, D, Hkv, hd], wo [L, Hq, hd, D],
  ffn_norm [L, D], w_gate [L, D, F], w_up [L, D, F], w_down [L, F, D].

The readers import the shape helpers from here; this module imports the readers only inside
`load_checkpoint`, so there is no import cycle.
"""

from __future__ import annotations

import numpy as np

from flying_jax.config import Architecture, ModelCard

NORMS = ("final_norm", "attn_norm", "ffn_norm")


def expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
  """The canonical name -> shape table for `arch` (`lm_head` only when not tied)."""
  a = arch
  shapes = {
      "embed": (a.vocab_size, a.dim),
      "final_norm": (a.dim,),
      "attn_norm": (a.n_layers, a.dim),
      "wq": (a.n_layers, a.dim, a.n_heads, a.head_dim),
      "wk": (a.n_layers, a.dim, a.n_kv_heads, a.head_dim),
      "wv": (a.n_layers, a.dim, a.n_kv_heads, a.head_dim),
      "wo": (a.n_layers, a.n_heads, a.head_dim, a.dim),
      "ffn_norm": (a.n_layers, a.dim),
      "w_gate": (a.n_layers, a.dim, a.ffn_dim),
      "w_up": (a.n_layers, a.dim, a.ffn_dim),
      "w_down": (a.n_layers, a.ffn_dim, a.dim),
  }
  if not a.tied_embeddings:
    shapes["lm_head"] = (a.vocab_size, a.dim)
  return shapes


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


def load_checkpoint(card: ModelCard) -> dict[str, np.ndarray]:
  """The canonical float32 weights of `card`, read from GGUF, safetensors, or made at random."""
  fmt = card.weights.format
  if fmt == "gguf":
    from flying_jax.checkpoints.gguf_reader import load_gguf, resolve_gguf_path
    weights = load_gguf(resolve_gguf_path(card.weights), card.arch)
  elif fmt == "safetensors":
    from flying_jax.checkpoints.safetensors_reader import load_safetensors_dir
    if not card.weights.path:
      raise ValueError(f"model {card.name}: safetensors weights need `path` (a directory)")
    weights = load_safetensors_dir(card.weights.path, card.arch)
  elif fmt == "random":
    from flying_jax.checkpoints.random_init import random_weights
    weights = random_weights(card.arch, card.weights.seed)
  else:
    raise ValueError(f"model {card.name}: weights format {fmt!r} is not supported by load_checkpoint"
                     " (known: gguf, safetensors, random)")
  check_shapes(weights, card.arch)
  return weights
