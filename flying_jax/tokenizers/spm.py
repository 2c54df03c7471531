"""SentencePiece tokenizers (`.model` files of Llama-2, Mistral, Gemma style models)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from flying_jax.tokenizers.base import Tokenizer


class SentencePieceTokenizer(Tokenizer):
  """A `sentencepiece.SentencePieceProcessor` behind the `Tokenizer` interface.

  Control pieces written in the text (`<s>`, `</s>`, `[INST]` when the model declares it a control
  piece) are matched atomically; the text between them is encoded piece by piece as SentencePiece
  does (with its dummy-prefix space), which is how Hugging Face's Llama tokenizer treats them too.
  """

  def __init__(self, sp, *, stop_ids: Sequence[int] = (), chat_template: str | None = None):
    """`sp` is a loaded `SentencePieceProcessor`; stop ids default to the model's EOS."""
    self.sp = sp
    n = sp.get_piece_size()
    self._special = frozenset(i for i in range(n) if sp.is_control(i))
    pieces = sorted((sp.id_to_piece(i) for i in self._special), key=len, reverse=True)
    self._split = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None
    eos = sp.eos_id()
    super().__init__(vocab_size=n, bos_id=sp.bos_id() if sp.bos_id() >= 0 else None,
                     eos_ids=stop_ids or ([eos] if eos >= 0 else []),
                     chat_template=chat_template)

  @classmethod
  def from_file(cls, path: str | Path, **kwargs) -> SentencePieceTokenizer:
    """Load a `.model` file."""
    return cls.from_bytes(Path(path).read_bytes(), **kwargs)

  @classmethod
  def from_bytes(cls, model_proto: bytes, **kwargs) -> SentencePieceTokenizer:
    """Load a serialized model (the bytes of a `.model` file)."""
    import sentencepiece

    return cls(sentencepiece.SentencePieceProcessor(model_proto=model_proto), **kwargs)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    if self._split is None:
      return self._prepend_bos(self.sp.encode(text), add_bos)
    ids: list[int] = []
    for i, part in enumerate(self._split.split(text)):
      if i % 2:
        ids.append(self.sp.piece_to_id(part))
      elif part:
        ids.extend(self.sp.encode(part))
    return self._prepend_bos(ids, add_bos)

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    n = self.vocab_size
    ids = [int(i) for i in ids if 0 <= i < n]
    if skip_special:
      return self.sp.decode(ids)
    out, run = [], []
    for i in ids:
      if i in self._special:
        out += [self.sp.decode(run), self.sp.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    return "".join(out) + self.sp.decode(run)

  def id_to_token(self, token_id: int) -> str | None:
    return self.sp.id_to_piece(int(token_id)) if 0 <= token_id < self.vocab_size else None

  def token_to_id(self, token: str) -> int | None:
    i = self.sp.piece_to_id(token)
    return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

  @property
  def special_ids(self) -> frozenset[int]:
    return self._special
