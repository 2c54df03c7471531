"""The byte tokenizer of random-weight models: ids 0..255 are UTF-8 bytes, higher ids are silent."""

from __future__ import annotations

from collections.abc import Sequence

from flying_jax.tokenizers.base import Tokenizer


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as token ids. `vocab_size` is the model's (ids >= 256 decode to nothing), there is
  no BOS and no special token; invalid byte sequences decode to U+FFFD."""

  def __init__(self, vocab_size: int, *, stop_ids: Sequence[int] = (),
               chat_template: str | None = None):
    super().__init__(vocab_size=vocab_size, bos_id=None, eos_ids=stop_ids,
                     chat_template=chat_template)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

  def id_to_token(self, token_id: int) -> str | None:
    if 0 <= token_id < 256:
      return f"<0x{token_id:02X}>"
    return "" if 0 <= token_id < self.vocab_size else None

  def token_to_id(self, token: str) -> int | None:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
      try:
        return int(token[3:5], 16)
      except ValueError:
        return None
    return None

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset()
