"""Streaming detokenization and stop-string search for text that arrives a few tokens at a time.

`IncrementalDetokenizer` uses the prefix-offset / read-offset technique of vLLM (and of Hugging
Face's text-generation-inference): each step decodes a short window of recent ids twice, with and
without the new ones, and emits the difference. Decoding a window rather than single tokens keeps
the spaces SentencePiece attaches to word starts, and text is held back while the window ends in
U+FFFD, i.e. in the middle of a multi-byte character split across byte-level tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flying_jax.tokenizers.base import Tokenizer

_CONTEXT_TOKENS = 5   # prompt tokens decoded as left context for the first generated ones


class IncrementalDetokenizer:
  """Turns a growing sequence of generated ids into text deltas.

  Pushing ids one by one (or in any chunks), then calling `flush()`, yields pieces whose
  concatenation equals `tokenizer.decode(generated_ids)` (without prompt) or the text after the
  prompt (with prompt), and no piece ends inside a multi-byte character.
  """

  def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
               skip_special: bool = True):
    self.tokenizer = tokenizer
    self.skip_special = skip_special
    self._ids = [int(i) for i in prompt_ids or ()]
    self._read = len(self._ids)
    self._prefix = max(self._read - _CONTEXT_TOKENS, 0)
    self._n_prompt = len(self._ids)
    self._text: list[str] = []

  @property
  def text(self) -> str:
    """All text emitted so far (what `push` and `flush` returned, concatenated)."""
    return "".join(self._text)

  @property
  def generated_ids(self) -> list[int]:
    """The ids pushed so far (not the prompt)."""
    return self._ids[self._n_prompt:]

  def _window(self, start: int, stop: int | None = None) -> str:
    return self.tokenizer.decode(self._ids[start:stop], skip_special=self.skip_special)

  def push(self, ids: int | Iterable[int]) -> str:
    """Append generated ids; return the text they complete (may be empty while a character or a
    byte sequence is still incomplete)."""
    self._ids.extend([int(ids)] if isinstance(ids, int) else (int(i) for i in ids))
    prefix_text = self._window(self._prefix, self._read)
    new_text = self._window(self._prefix)
    if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
      return ""
    delta = new_text[len(prefix_text):]
    self._prefix, self._read = self._read, len(self._ids)
    self._text.append(delta)
    return delta

  def flush(self) -> str:
    """Emit what is held back (at the end of generation), replacement characters included."""
    prefix_text = self._window(self._prefix, self._read)
    delta = self._window(self._prefix)[len(prefix_text):]
    self._prefix, self._read = self._read, len(self._ids)
    if delta:
      self._text.append(delta)
    return delta


def find_stop(text: str, stop_strings: Sequence[str], start: int = 0) -> int:
  """Index in `text` where the earliest of `stop_strings` begins, or -1.

  `start` is how much of `text` was already searched (its length at the previous call); the search
  backs up by the longest stop string so a match straddling the old end is found.
  """
  stops = [s for s in stop_strings if s]
  if not stops:
    return -1
  begin = max(0, start - max(map(len, stops)) + 1)
  found = [i for i in (text.find(s, begin) for s in stops) if i >= 0]
  return min(found) if found else -1


def partial_stop_len(text: str, stop_strings: Sequence[str]) -> int:
  """Length of the longest tail of `text` that could begin a stop string: text a streaming server
  holds back until the next tokens show whether the stop string completes."""
  best = 0
  for s in stop_strings:
    for k in range(min(len(s) - 1, len(text)), best, -1):
      if text.endswith(s[:k]):
        best = k
        break
  return best
