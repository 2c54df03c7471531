"""Byte-level BPE tokenizers stored in a GGUF file (`tokenizer.ggml.model = "gpt2"`, e.g. SmolLM2).

The vocabulary (`tokenizer.ggml.tokens`), merges (`tokenizer.ggml.merges`) and token types
(`tokenizer.ggml.token_type`) are read from the GGUF metadata and rebuilt as a `tokenizers` BPE
model: pre-tokenizer `Digits(individual_digits=True)` then `ByteLevel(add_prefix_space=False)`, a
ByteLevel decoder, control tokens (type 3) as special tokens and user-defined tokens (type 4) as
plain added tokens, both matched atomically in text.

Only the metadata block at the head of the file is parsed (a small reader below, same layout as
`gguf.GGUFReader` but without building its per-tensor views, which take seconds on a 49k vocab).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from flying_jax.tokenizers.base import TokenizerError
from flying_jax.tokenizers.hf_json import HFTokenizer

# GGUF value type code -> struct format (8 = string, 9 = array are handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_CONTROL, _USER_DEFINED = 3, 4
# llama.cpp pre-tokenizer names served by this builder, and whether digits are split one by one.
_PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "default": False}


class _MetadataReader:
  """Walks the key/value section of a GGUF file (versions 2 and 3, either byte order)."""

  def __init__(self, buf):
    self.buf, self.pos = buf, 4
    if bytes(buf[:4]) != b"GGUF":
      raise TokenizerError("not a GGUF file (bad magic number)")
    self.order = "<"
    version = self.take("I")
    if version & 0xFFFF == 0:   # written big-endian
      self.order = ">"
      version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version < 2:
      raise TokenizerError(f"GGUF version {version} is not supported (need 2 or later)")
    self.take("Q")              # tensor count
    self.n_kv = self.take("Q")

  def take(self, fmt: str):
    (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
    self.pos += struct.calcsize(self.order + fmt)
    return value

  def string(self) -> str:
    n = self.take("Q")
    self.pos += n
    return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8")

  def value(self, kind: int):
    if kind == 8:
      return self.string()
    if kind == 9:
      item_kind, n = self.take("I"), self.take("Q")
      if item_kind in _SCALARS:
        fmt = f"{self.order}{n}{_SCALARS[item_kind]}"
        items = list(struct.unpack_from(fmt, self.buf, self.pos))
        self.pos += struct.calcsize(fmt)
        return items
      return [self.value(item_kind) for _ in range(n)]
    if kind not in _SCALARS:
      raise TokenizerError(f"GGUF metadata: unknown value type {kind}")
    return self.take(_SCALARS[kind])

  def items(self, wanted_prefix: str = "") -> dict:
    out = {}
    for _ in range(self.n_kv):
      key, kind = self.string(), self.take("I")
      value = self.value(kind)
      if key.startswith(wanted_prefix):
        out[key] = value
    return out


def read_tokenizer_metadata(path: str | Path) -> dict:
  """All `tokenizer.*` keys of a GGUF file's metadata, as Python values (arrays as lists)."""
  with open(path, "rb") as f:
    if os.fstat(f.fileno()).st_size < 24:
      raise TokenizerError(f"{path}: not a GGUF file (too short)")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
      try:
        return _MetadataReader(mm).items("tokenizer.")
      except (struct.error, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: malformed GGUF metadata ({e})") from None


def build_hf_tokenizer(meta: dict):
  """A `tokenizers.Tokenizer` equivalent to the GGUF byte-level BPE described by `meta`."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  model = meta.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise TokenizerError(
        f"GGUF tokenizer model {model!r} is not supported: known 'gpt2' (byte-level BPE) and "
        "'llama' (SentencePiece)")
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZERS:
    raise TokenizerError(
        f"GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(_PRE_TOKENIZERS)}")
  tokens = meta["tokenizer.ggml.tokens"]
  types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
  hf = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if _PRE_TOKENIZERS[pre]:
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    hf.pre_tokenizer = byte_level
  hf.decoder = decoders.ByteLevel()
  def added(kind: int) -> list:
    return [AddedToken(tokens[i], special=(kind == _CONTROL), normalized=False)
            for i, t in enumerate(types) if t == kind]

  hf.add_special_tokens(added(_CONTROL))   # entries already in the vocabulary keep their ids
  hf.add_tokens(added(_USER_DEFINED))
  return hf


def load(path: str | Path, *, stop_ids: Sequence[int] = (), chat_template: str | None = None):
  """The tokenizer of the GGUF file at `path`: byte-level BPE here, SentencePiece ("llama")
  through `spm_gguf`. Stop ids default to the file's EOS token."""
  meta = read_tokenizer_metadata(path)
  if "tokenizer.ggml.tokens" not in meta:
    raise TokenizerError(f"{path}: the GGUF file holds no tokenizer (tokenizer.ggml.tokens)")
  if meta.get("tokenizer.ggml.model") == "llama":
    from flying_jax.tokenizers import spm_gguf
    return spm_gguf.load(meta, stop_ids=stop_ids, chat_template=chat_template, where=path)
  eos = meta.get("tokenizer.ggml.eos_token_id")
  bos = meta.get("tokenizer.ggml.bos_token_id")
  add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
  return HFTokenizer(build_hf_tokenizer(meta), bos_id=bos if add_bos else None,
                     eos_ids=stop_ids or ([] if eos is None else [eos]),
                     chat_template=chat_template)
