"""A model's tokenizer as llguidance sees it: every token id's bytes, which ids are special, EOS.

llguidance computes a token mask by walking a trie of the tokens' byte strings, so it needs the
exact bytes each id stands for, not its decoded text. Each backend of `flying_jax.tokenizers`
gives them its own way:

- `tokenizer.json` and GGUF byte-level BPE (`HFTokenizer`): the Hugging Face tokenizer's JSON,
  which llguidance reads itself (byte-level and metaspace vocabularies alike);
- SentencePiece (`SentencePieceTokenizer`): the pieces, "▁" as a space, `<0xXX>` byte pieces as
  that byte, control and unknown pieces special;
- raw bytes (`ByteTokenizer`, the random-weight test models): ids 0..255 are the bytes, higher
  ids special (they decode to nothing).

llguidance also tokenizes text a grammar forces, and keeps a forced run to that tokenization's
tokens: the encoder it is given must tokenize text in the middle of a sequence, so the
SentencePiece one has no dummy prefix (a leading "▁" it would add to every forced run would make
the mask allow that space and nothing else).

EOS is what llguidance allows exactly when the constraint is satisfied: the tokenizer's stop ids
(all of them). A tokenizer without any (a byte model whose card names none) gets its last
special id as EOS, or one virtual id past its vocabulary when it has none: the mask never allows
an id the logits do not have, so such a sequence ends when its constraint is complete.
"""

from __future__ import annotations

import llguidance

from flying_jax.tokenizers.base import Tokenizer


class _Vocabulary:
  """What `llguidance.TokenizerWrapper` reads: the bytes of every id, the special ids, EOS, and
  encoding (llguidance tokenizes the text a grammar forces)."""

  def __init__(self, tokens: list[bytes], special: list[int], eos: int, encode):
    self.tokens, self.special_token_ids = tokens, special
    self.eos_token_id, self.bos_token_id = eos, None
    self._encode = encode

  def __call__(self, text) -> list[int]:
    return self._encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


def _special_name(i: int) -> bytes:
  return f"<|special_{i}|>".encode()


def _with_eos(tokens: list[bytes], special: list[int], eos_ids) -> tuple[list[int], list[int]]:
  """The EOS ids (stop ids, else the last special id, else a virtual id appended to `tokens`)."""
  if eos_ids:
    return list(eos_ids), special
  if special:
    return [special[-1]], special
  tokens.append(_special_name(len(tokens)))
  return [len(tokens) - 1], special + [len(tokens) - 1]


def _spm_inner_encoder(tokenizer):
  """SentencePiece encoding of text inside a sequence: the model without its dummy prefix."""
  import sentencepiece
  from sentencepiece import sentencepiece_model_pb2 as pb

  proto = pb.ModelProto()
  proto.ParseFromString(tokenizer.sp.serialized_model_proto())
  proto.normalizer_spec.add_dummy_prefix = False
  proto.normalizer_spec.remove_extra_whitespaces = False     # a forced run keeps its spaces
  inner = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
  return inner.encode


def _spm_vocabulary(tokenizer) -> tuple[list[bytes], list[int]]:
  sp = tokenizer.sp
  tokens, special = [], []
  for i in range(sp.get_piece_size()):
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):
      tokens.append(bytes([int(piece[3:5], 16)]))
    elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
      tokens.append(_special_name(i))
      special.append(i)
    else:
      tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
  return tokens, special


def _byte_vocabulary(tokenizer) -> tuple[list[bytes], list[int]]:
  n = tokenizer.vocab_size
  special = list(range(256, n))
  return [bytes([i]) for i in range(min(n, 256))] + [_special_name(i) for i in special], special


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
  """The llguidance tokenizer of one of `flying_jax.tokenizers`' backends (costs up to a second
  for a 50k-entry vocabulary: build it once per engine)."""
  from flying_jax.tokenizers.byte import ByteTokenizer
  from flying_jax.tokenizers.hf_json import HFTokenizer
  from flying_jax.tokenizers.spm import SentencePieceTokenizer

  if isinstance(tokenizer, HFTokenizer):
    eos = list(tokenizer.eos_ids) or sorted(tokenizer.special_ids)[-1:]
    if not eos:
      raise ValueError("structured output needs an end-of-sequence token: the model card names "
                       "no stop ids and the tokenizer has no special token")
    return llguidance.LLTokenizer(tokenizer.hf.to_str(), eos_token=eos)
  encode = tokenizer.encode
  if isinstance(tokenizer, SentencePieceTokenizer):
    tokens, special = _spm_vocabulary(tokenizer)
    encode = _spm_inner_encoder(tokenizer)
  elif isinstance(tokenizer, ByteTokenizer):
    tokens, special = _byte_vocabulary(tokenizer)
  else:
    raise ValueError(f"structured output does not know the vocabulary of a "
                     f"{type(tokenizer).__name__}")
  eos, special = _with_eos(tokens, special, tokenizer.eos_ids)
  wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokens, special, eos[0], encode))
  return llguidance.LLTokenizer(wrapper, eos_token=eos)
