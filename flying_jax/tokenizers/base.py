"""The tokenizer interface every backend implements, and `load_tokenizer`, which picks the backend.

A `Tokenizer` turns text into token ids and back. Backends: byte-level BPE read from a GGUF file
(`bpe_gguf.py`), SentencePiece `.model` files (`spm.py`), Hugging Face `tokenizer.json` files
(`hf_json.py`) and raw UTF-8 bytes for random-weight models (`byte.py`). Conventions shared by all:

- `encode` never adds special tokens unless asked; `add_bos=True` prepends `bos_id` when the model
  uses one (`bos_id is None` means it does not, and `add_bos` is then a no-op). `encode_prompt`
  is what serving uses: BOS first when the model takes one and the text lacks it.
- Special-token strings in the text (`<|im_end|>`, `<s>`) are matched atomically, so a rendered chat
  prompt encodes to the ids the model was trained on. Encode chat prompts with `add_bos=False`: the
  templates write the BOS token themselves where the format wants one.
- `decode` ignores ids outside the tokenizer's vocabulary (a padded embedding table may sample
  them).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flying_jax.tokenizers import chat

if TYPE_CHECKING:
  from flying_jax.config import ModelCard


class TokenizerError(ValueError):
  """A tokenizer cannot be built from the model card (unknown kind, unsupported file contents)."""


class Tokenizer(abc.ABC):
  """Text <-> token ids for one model.

  Attributes:
    vocab_size: number of ids the tokenizer knows (the model's embedding table may be larger).
    bos_id: id prepended by `encode(add_bos=True)`, or None when the model takes no BOS.
    eos_ids: ids that end generation: the card's `stop_ids`, else the tokenizer's own EOS.
    chat_template: name of the chat format (`"chatml"`, `"llama2"`) or None.
  """

  def __init__(self, *, vocab_size: int, bos_id: int | None, eos_ids: Sequence[int],
               chat_template: str | None):
    self.vocab_size = int(vocab_size)
    self.bos_id = None if bos_id is None else int(bos_id)
    self.eos_ids = tuple(int(i) for i in eos_ids)
    self.chat_template = chat_template

  @abc.abstractmethod
  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of `text`; special-token strings inside it become their single ids."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    """Text of `ids`; special tokens are dropped when `skip_special`, else written out."""

  @abc.abstractmethod
  def id_to_token(self, token_id: int) -> str | None:
    """The vocabulary entry (piece) of `token_id`, None when out of range."""

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int | None:
    """The id of the vocabulary entry `token`, None when absent."""

  @property
  @abc.abstractmethod
  def special_ids(self) -> frozenset[int]:
    """Ids of the control tokens (BOS, EOS, `<|im_start|>`, ...)."""

  def encode_prompt(self, text: str) -> list[int]:
    """The ids a prompt is served as: `encode(text)` with the model's BOS in front when it takes
    one (Gemma, Llama-2) and the text does not already start with it (a chat template that
    writes its own BOS). What Hugging Face tokenizers do with `add_special_tokens=True`."""
    bos = self._token_text(self.bos_id)
    return self.encode(text, add_bos=self.bos_id is not None and not (bos and text.startswith(bos)))

  def _prepend_bos(self, ids: list[int], add_bos: bool) -> list[int]:
    return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """Render `[{"role": ..., "content": ...}, ...]` as the model's prompt text (see `chat.py`)."""
    if self.chat_template is None:
      raise TokenizerError(
          "this model card has no chat template (set [tokenizer] chat_template); "
          "pass a plain prompt instead")
    return chat.render(self.chat_template, messages, add_generation_prompt,
                       bos=self._token_text(self.bos_id), eos=self._token_text(self._first_eos()))

  def _first_eos(self) -> int | None:
    return self.eos_ids[0] if self.eos_ids else None

  def _token_text(self, token_id: int | None) -> str:
    return "" if token_id is None else (self.id_to_token(token_id) or "")

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, chat_template={self.chat_template!r})")


def _existing(path: str | Path | None, what: str) -> Path:
  if not path:
    raise TokenizerError(f"{what}: no path given (set [tokenizer] path in the model card)")
  p = Path(path).expanduser()
  if not p.is_file():
    raise FileNotFoundError(f"{what} file {str(p)!r} does not exist")
  return p


def resolve_gguf_path(card: ModelCard, gguf_path: str | Path | None = None) -> Path:
  """The GGUF file of `card`: `gguf_path` if given, else the card's weights file (its `path`,
  `file` in the installed `package`, or the file its `parts` assemble)."""
  if gguf_path is not None:
    return _existing(gguf_path, "GGUF")
  w = card.weights
  if w.path:
    return _existing(w.path, "GGUF")
  if w.file and (w.package or w.parts):
    from flying_jax.checkpoints.gguf_reader import assemble_parts, package_dir

    try:
      return assemble_parts(w) if w.parts else _existing(package_dir(w.package) / w.file, "GGUF")
    except FileNotFoundError as e:
      raise FileNotFoundError(f"model {card.name!r}: {e}") from None
  raise TokenizerError(
      f"model {card.name!r}: tokenizer kind 'gguf' needs a GGUF file: pass gguf_path or set "
      "[weights] path, or package (or parts) and file")


def load_tokenizer(card: ModelCard, gguf_path: str | Path | None = None) -> Tokenizer:
  """Build the tokenizer the model card describes, dispatching on `card.tokenizer.kind`."""
  spec = card.tokenizer
  common = dict(stop_ids=spec.stop_ids, chat_template=spec.chat_template)
  if spec.kind == "gguf":
    from flying_jax.tokenizers import bpe_gguf
    return bpe_gguf.load(resolve_gguf_path(card, gguf_path or spec.path), **common)
  if spec.kind == "sentencepiece":
    from flying_jax.tokenizers import spm
    return spm.SentencePieceTokenizer.from_file(_existing(spec.path, "SentencePiece"), **common)
  if spec.kind == "tokenizer.json":
    from flying_jax.tokenizers import hf_json
    return hf_json.HFTokenizer.from_file(_existing(spec.path, "tokenizer.json"), **common)
  if spec.kind == "bytes":
    from flying_jax.tokenizers import byte
    return byte.ByteTokenizer(card.arch.vocab_size, **common)
  raise TokenizerError(
      f"model {card.name!r}: unknown tokenizer kind {spec.kind!r}; "
      "known: gguf, sentencepiece, tokenizer.json, bytes")
