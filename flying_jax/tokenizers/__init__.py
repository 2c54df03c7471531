"""Tokenizers: text <-> token ids, chat templates and streaming detokenization."""

from flying_jax.tokenizers.base import Tokenizer, TokenizerError, load_tokenizer, resolve_gguf_path
from flying_jax.tokenizers.chat import render as render_chat
from flying_jax.tokenizers.stream import IncrementalDetokenizer, find_stop, partial_stop_len

__all__ = [
    "IncrementalDetokenizer",
    "Tokenizer",
    "TokenizerError",
    "find_stop",
    "load_tokenizer",
    "partial_stop_len",
    "render_chat",
    "resolve_gguf_path",
]
