"""Read Llama GGUF files (F32, F16, Q8_0, Q4_0, Q4_1, ...) into the canonical float32 layout.

The header is parsed here rather than with `gguf.GGUFReader`: that reader builds a numpy view for
every element of every metadata array, which takes seconds on a 49k-token vocabulary. Array
metadata is skipped unless asked for. Dequantization is `gguf.quants.dequantize`.

GGUF stores a [out, in] matrix with dims reversed (ne0 = in); as numpy it is [out, in] again.
Llama Q/K rows are permuted for interleaved (GPT-J) RoPE; `unpermute_rope_rows` restores the
Hugging Face rotate-half order.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import mmap
import struct
from pathlib import Path
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from flying_jax.checkpoints.loader import Tensor, expect_shape, expected_shapes, prefetch, stack
from flying_jax.config import Architecture, WeightsSource

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_PER_LAYER = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")


class GGUFTensor(NamedTuple):
  """One tensor of a GGUF file: its bytes, not yet dequantized."""
  name: str
  qtype: int               # a gguf.GGMLQuantizationType value
  shape: tuple[int, ...]   # numpy order: GGUF dims reversed, in elements
  raw: np.ndarray          # uint8, numpy shape with the last dim in bytes


class GGUFFile(NamedTuple):
  """The parsed header of a GGUF file and its (memory-mapped) tensors."""
  path: Path
  metadata: dict[str, Any]
  tensors: dict[str, GGUFTensor]


class _Cursor:
  """Sequential little-endian reads over a memory-mapped GGUF header."""

  def __init__(self, buf, offset: int = 0):
    self.buf, self.off = buf, offset

  def scalar(self, fmt: str):
    (value,) = struct.unpack_from(fmt, self.buf, self.off)
    self.off += struct.calcsize(fmt)
    return value

  def string(self) -> str:
    n = self.scalar("<Q")
    self.off += n
    return bytes(self.buf[self.off - n:self.off]).decode("utf-8", errors="replace")

  def skip_string(self) -> None:
    self.off += 8 + struct.unpack_from("<Q", self.buf, self.off)[0]

  def value(self, vtype: int, arrays: bool):
    if vtype == _STRING:
      return self.string()
    if vtype == _ARRAY:
      return self.array(arrays)
    if vtype not in _SCALARS:
      raise ValueError(f"unknown GGUF metadata value type {vtype}")
    return self.scalar(_SCALARS[vtype])

  def array(self, keep: bool):
    """An array value; when not `keep`, skipped and summarized as ('array', type, count)."""
    etype, count = self.scalar("<I"), self.scalar("<Q")
    if etype in _SCALARS and etype != 7:
      dtype = np.dtype(_SCALARS[etype])
      start, self.off = self.off, self.off + count * dtype.itemsize
      return np.frombuffer(self.buf, dtype, count, start).copy() if keep else ("array", etype, count)
    if not keep:
      skip = self.skip_string if etype == _STRING else (lambda: self.value(etype, False))
      for _ in range(count):
        skip()
      return ("array", etype, count)
    return [self.value(etype, True) for _ in range(count)]


def resolve_gguf_path(weights: WeightsSource) -> Path:
  """The GGUF file named by `weights.path`, or `weights.file` inside installed `weights.package`."""
  if weights.path:
    path = Path(weights.path).expanduser()
  elif weights.package and weights.file:
    spec = importlib.util.find_spec(weights.package)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(
          f"package {weights.package!r} (which ships {weights.file}) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / weights.file
  else:
    raise ValueError("GGUF weights need `path`, or `package` and `file`")
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  if weights.sha256:
    verify_sha256(path, weights.sha256)
  return path


def verify_sha256(path: Path, expected: str) -> None:
  """Raise ValueError if the sha256 of the file at `path` is not `expected`."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  if digest.hexdigest() != expected.lower():
    raise ValueError(
        f"sha256 mismatch for {path}: file has {digest.hexdigest()}, card expects {expected}")


def read_gguf(path: str | Path, arrays: bool = False) -> GGUFFile:
  """Parse the header of a GGUF file; tensors stay memory-mapped. `arrays` decodes array metadata."""
  path = Path(path)
  with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  if buf[:4] != _MAGIC:
    raise ValueError(f"{path} is not a GGUF file")
  cur = _Cursor(buf, 4)
  version = cur.scalar("<I")
  if version not in (2, 3):
    raise ValueError(f"{path}: unsupported GGUF version {version} (big-endian files are not supported)")
  n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
  metadata = {}
  for _ in range(n_kv):
    key = cur.string()
    metadata[key] = cur.value(cur.scalar("<I"), arrays)
  infos = [_tensor_info(cur) for _ in range(n_tensors)]
  align = int(metadata.get("general.alignment", 32))
  data_start = -(-cur.off // align) * align
  tensors = {name: _map_tensor(buf, data_start + off, name, qtype, dims)
             for name, qtype, dims, off in infos}
  return GGUFFile(path, metadata, tensors)


def _tensor_info(cur: _Cursor) -> tuple[str, int, tuple[int, ...], int]:
  name = cur.string()
  dims = tuple(cur.scalar("<Q") for _ in range(cur.scalar("<I")))
  return name, cur.scalar("<I"), dims, cur.scalar("<Q")


def _map_tensor(buf, start: int, name: str, qtype: int, dims: tuple[int, ...]) -> GGUFTensor:
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

  qt = GGMLQuantizationType(qtype)
  block, type_size = GGML_QUANT_SIZES[qt]
  shape = tuple(reversed(dims))
  if shape[-1] % block:
    raise ValueError(
        f"GGUF tensor {name}: row of {shape[-1]} is not a multiple of the {qt.name} block {block}")
  byte_shape = shape[:-1] + (shape[-1] // block * type_size,)
  raw = np.frombuffer(buf, np.uint8, int(np.prod(byte_shape)), start).reshape(byte_shape)
  return GGUFTensor(name, qtype, shape, raw)


def dequantize(tensor: GGUFTensor) -> np.ndarray:
  """The tensor as a new float32 array of numpy shape `tensor.shape`."""
  from gguf import GGMLQuantizationType
  from gguf.quants import dequantize as gguf_dequantize

  qt = GGMLQuantizationType(tensor.qtype)
  try:
    out = gguf_dequantize(tensor.raw, qt)
  except NotImplementedError:
    raise ValueError(f"GGUF tensor {tensor.name}: quantization {qt.name} is not supported") from None
  out = np.asarray(out, dtype=np.float32)
  if np.may_share_memory(out, tensor.raw):
    out = out.copy()  # own the memory, never a view of the mapped file
  return out.reshape(tensor.shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row permutation of an [n_heads*hd, D] matrix (GGUF -> HF rotate-half)."""
  hd = w.shape[0] // n_heads
  return w.reshape(n_heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's Q/K row permutation (HF rotate-half -> GGUF interleaved); inverse of the above."""
  hd = w.shape[0] // n_heads
  return w.reshape(n_heads, 2, hd // 2, -1).swapaxes(1, 2).reshape(w.shape)


def check_metadata(metadata: dict[str, Any], arch: Architecture, where: str = "GGUF") -> None:
  """Raise ValueError when the llama.* header keys disagree with the card's architecture."""
  pairs = {"llama.block_count": arch.n_layers, "llama.embedding_length": arch.dim,
           "llama.attention.head_count": arch.n_heads,
           "llama.attention.head_count_kv": arch.n_kv_heads,
           "llama.feed_forward_length": arch.ffn_dim}
  for key, want in pairs.items():
    if key in metadata and int(metadata[key]) != want:
      raise ValueError(f"{where}: {key} = {metadata[key]} but the model card says {want}")
  from flying_jax.model.families import family_of

  arch_name = metadata.get("general.architecture", "llama")
  readable = family_of(arch.family).gguf_architectures
  if arch_name not in readable:
    raise ValueError(f"{where}: architecture {arch_name!r} is not supported for the "
                     f"{arch.family} family (reads {', '.join(readable)})")


def iter_gguf(path: str | Path, arch: Architecture, threads: int = 2) -> Iterator[Tensor]:
  """A Llama GGUF file's tensors one at a time, dequantized to float32, in canonical orientation
  (see `loader`); `threads` tensors decode side by side."""
  gf = read_gguf(path)
  check_metadata(gf.metadata, arch, str(gf.path))
  shapes = expected_shapes(arch)
  names = {"embed": "token_embd.weight", "final_norm": "output_norm.weight"}
  if not arch.tied_embeddings:
    names["lm_head"] = "output.weight"
  top = lambda k: lambda: Tensor(k, None, expect_shape(names[k], _get(gf, names[k]), shapes[k],
                                                       str(gf.path)))
  jobs = [top(k) for k in names]
  jobs += [functools.partial(_layer_tensor, gf, i, key, arch) for i in range(arch.n_layers)
           for key in _PER_LAYER]
  return prefetch(jobs, threads)


def load_gguf(path: str | Path, arch: Architecture, threads: int = 2) -> dict[str, np.ndarray]:
  """Canonical float32 weights from a Llama GGUF file (see `loader` for the layout)."""
  return stack(iter_gguf(path, arch, threads), arch)


def _get(gf: GGUFFile, name: str) -> np.ndarray:
  if name not in gf.tensors:
    raise ValueError(f"GGUF file {gf.path} lacks tensor {name!r}")
  return dequantize(gf.tensors[name])


_GGUF = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
         "wo": "attn_output", "ffn_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up",
         "w_down": "ffn_down"}


def _layer_tensor(gf: GGUFFile, i: int, key: str, arch: Architecture) -> Tensor:
  """One canonical tensor of block `i` (without the leading L axis)."""
  a = arch
  q_out, kv_out = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
  name = f"blk.{i}.{_GGUF[key]}.weight"
  stored = {"attn_norm": (a.dim,), "ffn_norm": (a.dim,), "wq": (q_out, a.dim),
            "wk": (kv_out, a.dim), "wv": (kv_out, a.dim), "wo": (a.dim, q_out),
            "w_gate": (a.ffn_dim, a.dim), "w_up": (a.ffn_dim, a.dim),
            "w_down": (a.dim, a.ffn_dim)}[key]
  w = expect_shape(name, _get(gf, name), stored, str(gf.path))
  if key in ("attn_norm", "ffn_norm"):
    return Tensor(key, i, w)
  if key == "wq":
    w = unpermute_rope_rows(w, a.n_heads).T.reshape(a.dim, a.n_heads, a.head_dim)
  elif key == "wk":
    w = unpermute_rope_rows(w, a.n_kv_heads).T.reshape(a.dim, a.n_kv_heads, a.head_dim)
  elif key == "wv":
    w = w.T.reshape(a.dim, a.n_kv_heads, a.head_dim)
  elif key == "wo":
    w = w.T.reshape(a.n_heads, a.head_dim, a.dim)
  else:
    w = w.T
  return Tensor(key, i, w)
