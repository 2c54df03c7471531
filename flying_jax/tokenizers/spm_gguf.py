"""SentencePiece tokenizers stored in a GGUF file (`tokenizer.ggml.model = "llama"`, e.g. Gemma 3).

The pieces, scores and token types in the GGUF metadata are written back into a SentencePiece
`ModelProto` (BPE over scores, byte fallback, no normalisation, `add_dummy_prefix` from
`tokenizer.ggml.add_space_prefix`) and served by `sentencepiece` itself behind the
`SentencePieceTokenizer` interface, which matches control pieces (`<start_of_turn>`) atomically
the way Hugging Face tokenizers do. GGUF token types use SentencePiece's numbering (1 normal,
2 unknown, 3 control, 4 user defined, 5 unused, 6 byte); the unknown id is marked UNKNOWN even
where the file calls it a control piece. User-defined pieces made of spaces ("  ", stored with
plain spaces by llama.cpp's converter) are written back with SentencePiece's U+2581.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flying_jax.tokenizers.base import TokenizerError
from flying_jax.tokenizers.spm import SentencePieceTokenizer


def model_proto(meta: dict) -> bytes:
  """A serialized SentencePiece model equivalent to the GGUF tokenizer described by `meta`."""
  from sentencepiece import sentencepiece_model_pb2 as pb

  tokens = meta["tokenizer.ggml.tokens"]
  scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
  types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  if not len(tokens) == len(scores) == len(types):
    raise TokenizerError("GGUF tokenizer: tokens, scores and token types differ in length")
  unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
  m = pb.ModelProto()
  for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
    p = m.pieces.add()
    p.piece, p.score = piece.replace(" ", "\u2581"), float(score)   # spaces as SentencePiece writes them
    p.type = pb.ModelProto.SentencePiece.UNKNOWN if i == unk else (
        kind if kind in (1, 3, 4, 5, 6) else pb.ModelProto.SentencePiece.NORMAL)
  t = m.trainer_spec
  t.model_type = pb.TrainerSpec.BPE
  t.vocab_size = len(tokens)
  t.byte_fallback = any(k == 6 for k in types)
  t.unk_id = unk
  t.bos_id = meta.get("tokenizer.ggml.bos_token_id", -1)
  t.eos_id = meta.get("tokenizer.ggml.eos_token_id", -1)
  t.pad_id = meta.get("tokenizer.ggml.padding_token_id", -1)
  for role in ("unk", "bos", "eos", "pad"):      # sentencepiece finds these ids by piece
    i = getattr(t, f"{role}_id")
    if 0 <= i < len(tokens):
      setattr(t, f"{role}_piece", m.pieces[i].piece)
  t.split_digits = True
  n = m.normalizer_spec
  n.name = "identity"
  n.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  n.remove_extra_whitespaces = False
  n.escape_whitespaces = True
  return m.SerializeToString()


def load(meta: dict, *, stop_ids: Sequence[int] = (), chat_template: str | None = None,
         where: str | Path = "GGUF") -> SentencePieceTokenizer:
  """The SentencePiece tokenizer of a GGUF file's `tokenizer.*` metadata."""
  try:
    proto = model_proto(meta)
  except (KeyError, ValueError) as e:
    raise TokenizerError(f"{where}: cannot build a SentencePiece model ({e})") from None
  tok = SentencePieceTokenizer.from_bytes(proto, stop_ids=stop_ids, chat_template=chat_template)
  if not meta.get("tokenizer.ggml.add_bos_token", True):
    tok.bos_id = None
  return tok
