"""Constraints compiled by llguidance, one matcher per constrained sequence, and its token masks.

`Grammars` is one engine's llguidance state: its tokenizer (built on the first constrained
request, from the model's: `vocab.ll_tokenizer`) and, per distinct constraint, a matcher in its
start state compiled once and kept (least recently used first out); each sequence gets a copy
(a few microseconds), which it advances token by token. A constraint no compiler accepts (a bad
JSON Schema, regex or Lark grammar) raises `StructuredError` with llguidance's message when the
request is added, never later.

Masks use llguidance's layout: bit `v % 32` of 32-bit word `v // 32` is set when token `v` may
come next. `Grammars.fill` computes the masks of a step's constrained rows in one call
(llguidance's executor spreads them over threads) into rows of the step's mask array, whose
width is the model's vocabulary (ids past the tokenizer's stay masked).
"""

from __future__ import annotations

import collections
import json
import threading

import llguidance
import numpy as np

from flying_jax.sampling.params import StructuredOutputsParams
from flying_jax.sampling.structured.vocab import ll_tokenizer

# JSON as compact as json.dumps writes it: a small model given free whitespace may never stop
# emitting it, and a grammar that allows it gives it that chance
_JSON_OPTIONS = {"whitespace_flexible": False}
_CACHED = 256                       # distinct constraints kept compiled


class StructuredError(ValueError):
  """A constraint that does not compile (the message is llguidance's)."""


def grammar_of(so: StructuredOutputsParams) -> str:
  """llguidance's grammar text of a constraint (not checked yet: see `Grammars.compile`)."""
  kind = so.kind
  if kind == "json":
    return llguidance.LLMatcher.grammar_from_json_schema(so.json, defaults=_JSON_OPTIONS)
  if kind == "json_object":
    return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}',
                                                         defaults=_JSON_OPTIONS)
  if kind == "regex":
    return llguidance.LLMatcher.grammar_from_regex(so.regex)
  if kind == "grammar":
    return llguidance.LLMatcher.grammar_from_lark(so.grammar)
  # choice: Lark string literals take JSON's escapes, so any text is written exactly
  return llguidance.LLMatcher.grammar_from_lark(
      "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in so.choice))


class Matcher:
  """One sequence's position in its constraint: it has consumed exactly the sequence's output
  tokens (`consumed`), so the next mask is that of the token the sequence samples next."""

  __slots__ = ("ll", "consumed")

  def __init__(self, ll: llguidance.LLMatcher):
    self.ll, self.consumed = ll, 0

  def consume(self, token: int) -> bool:
    """Advance by one sampled token; False (and an error state) when the constraint forbids it."""
    self.consumed += 1
    return self.ll.consume_token(int(token))

  @property
  def done(self) -> bool:
    """Nothing but EOS may follow: the constraint is complete (or broken: see `error`)."""
    return self.ll.is_stopped()

  @property
  def accepting(self) -> bool:
    return self.ll.is_accepting()

  @property
  def error(self) -> str:
    return self.ll.get_error()


class Grammars:
  """The llguidance tokenizer of one model and its compiled constraints (thread-safe: the
  serving threads check requests while the engine thread makes matchers)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self._ll: llguidance.LLTokenizer | None = None
    self._executor: llguidance.LLExecutor | None = None
    self._compiled: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  @property
  def ll(self) -> llguidance.LLTokenizer:
    """The llguidance tokenizer (built on first use)."""
    with self._lock:
      if self._ll is None:
        self._ll = ll_tokenizer(self.tokenizer)
        self._executor = llguidance.LLExecutor()
      return self._ll

  @property
  def words(self) -> int:
    """32-bit words of one llguidance mask."""
    return -(-self.ll.vocab_size // 32)

  def compile(self, so: StructuredOutputsParams) -> llguidance.LLMatcher:
    """The start-state matcher of `so` (compiled once, then kept); StructuredError if it does
    not compile."""
    with self._lock:
      got = self._compiled.get(so)
      if got is not None:
        self._compiled.move_to_end(so)
        return got
    ll = self.ll
    try:
      grammar = grammar_of(so)
    except ValueError as e:
      raise StructuredError(f"structured output ({so.kind}): {e}") from None
    matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
    if matcher.is_error():
      raise StructuredError(f"structured output ({so.kind}): {matcher.get_error().strip()}")
    with self._lock:
      self._compiled[so] = matcher
      while len(self._compiled) > _CACHED:
        self._compiled.popitem(last=False)
    return matcher

  def matcher(self, so: StructuredOutputsParams) -> Matcher:
    """A new sequence's matcher, in the start state of `so`."""
    return Matcher(self.compile(so).deep_copy())

  def fill(self, at: list[tuple[Matcher, int]], out_NxW: np.ndarray):
    """Write the mask of each (matcher, row) of `at` into that row of `out_NxW` (int32, C order;
    W: the model's mask width, which may differ from the tokenizer's: ids past the narrower one
    are masked), in one call that llguidance spreads over its threads."""
    n, width = out_NxW.shape
    words = self.words
    if width == words and out_NxW.flags.c_contiguous:
      self._executor.unsafe_compute_mask_ptr([(m.ll, r) for m, r in at], out_NxW.ctypes.data,
                                             4 * words, n)
      return
    own = np.empty((len(at), words), np.int32)
    self._executor.unsafe_compute_mask_ptr([(m.ll, i) for i, (m, _) in enumerate(at)],
                                           own.ctypes.data, 4 * words, len(at))
    rows, keep = [r for _, r in at], min(width, words)
    out_NxW[rows, :keep] = own[:, :keep]
    out_NxW[rows, keep:] = 0
