"""Structured output: constraints compiled by llguidance, per-sequence matchers, token masks.

The device applies the masks (`flying_jax.sampling.device.apply_token_mask`); the engine makes a
sequence's matcher, advances it with each sampled token and fills each step's masks
(`flying_jax.engine.outputs`).
"""

from flying_jax.sampling.structured.grammars import (Grammars, Matcher, StructuredError,
                                                     grammar_of)
from flying_jax.sampling.structured.vocab import ll_tokenizer

__all__ = ["Grammars", "Matcher", "StructuredError", "grammar_of", "ll_tokenizer"]
