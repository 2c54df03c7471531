"""Tokenizers run by the Hugging Face `tokenizers` library (`tokenizer.json` files, GGUF BPE)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from flying_jax.tokenizers.base import Tokenizer


def _bos_from_post_processor(config: dict) -> int | None:
  """The special token a `TemplateProcessing` post-processor puts before `$A`, if any (the BOS)."""
  post = config.get("post_processor") or {}
  steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
  for step in steps:
    if step.get("type") != "TemplateProcessing":
      continue
    for item in step.get("single", []):
      if "Sequence" in item:
        return None
      name = item.get("SpecialToken", {}).get("id")
      ids = step.get("special_tokens", {}).get(name, {}).get("ids", [])
      if len(ids) == 1:
        return int(ids[0])
  return None


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` behind the `Tokenizer` interface.

  Encoding never runs the file's post-processor (`add_special_tokens=False`); BOS is added by
  `add_bos`, and is found in the post-processor template of a `tokenizer.json` (Llama-3 style).
  """

  def __init__(self, hf, *, bos_id: int | None, eos_ids: Sequence[int], chat_template: str | None):
    """`hf` is a built `tokenizers.Tokenizer`."""
    self.hf = hf
    self._special = frozenset(
        i for i, tok in hf.get_added_tokens_decoder().items() if tok.special)
    super().__init__(vocab_size=hf.get_vocab_size(with_added_tokens=True), bos_id=bos_id,
                     eos_ids=eos_ids, chat_template=chat_template)

  @classmethod
  def from_file(cls, path: str | Path, *, stop_ids: Sequence[int] = (),
                chat_template: str | None = None) -> HFTokenizer:
    """Load a `tokenizer.json`; stop ids default to none, as the file does not name an EOS."""
    from tokenizers import Tokenizer as HFTok

    text = Path(path).read_text(encoding="utf-8")
    return cls(HFTok.from_str(text), bos_id=_bos_from_post_processor(json.loads(text)),
               eos_ids=stop_ids, chat_template=chat_template)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    return self._prepend_bos(self.hf.encode(text, add_special_tokens=False).ids, add_bos)

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    n = self.vocab_size
    return self.hf.decode([int(i) for i in ids if 0 <= i < n], skip_special_tokens=skip_special)

  def id_to_token(self, token_id: int) -> str | None:
    return self.hf.id_to_token(int(token_id)) if 0 <= token_id < self.vocab_size else None

  def token_to_id(self, token: str) -> int | None:
    return self.hf.token_to_id(token)

  @property
  def special_ids(self) -> frozenset[int]:
    return self._special

  def save(self, path: str | Path) -> None:
    """Write the tokenizer as a `tokenizer.json` file."""
    self.hf.save(str(path))
