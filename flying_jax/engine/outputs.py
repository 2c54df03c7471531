"""What happens to a sampled token on the host: text, stop ids, stop strings, length limits.

Text is detokenized incrementally per sequence; a stop string may straddle tokens, so text that
could be the start of a stop string is held back until it is known not to be one.

A sequence under structured output has a matcher (`sampling.structured`), made when its first
token mask is needed (`fill_masks`) and advanced with each token it appends: it ends ("stop")
once its constraint is complete, and its matcher is dropped when it finishes for any reason. A
preempted sequence keeps it (its tokens do not change), and so does one moved by a switch.
"""

from __future__ import annotations

import time
from typing import Callable

from flying_jax.engine.sequence import Sequence, Status, TokenLogprob
from flying_jax.sampling import StructuredOutputsParams
from flying_jax.tokenizers import IncrementalDetokenizer, find_stop, partial_stop_len


class OutputProcessor:
  def __init__(self, tokenizer, clock: Callable[[], float] = time.monotonic):
    self.tokenizer, self.clock = tokenizer, clock
    self._detok: dict[int, IncrementalDetokenizer] = {}
    self._raw: dict[int, str] = {}        # detokenized text before stop-string cutting
    self._emitted: dict[int, int] = {}    # characters of seq.text already handed out
    self._grammars = None                 # `sampling.structured.Grammars`, on first use

  @property
  def grammars(self):
    """The model's compiled constraints (`sampling.structured.Grammars`; ValueError without a
    tokenizer)."""
    if self._grammars is None:
      if self.tokenizer is None:
        raise ValueError("structured output needs the model's tokenizer")
      from flying_jax.sampling.structured import Grammars
      self._grammars = Grammars(self.tokenizer)
    return self._grammars

  def check(self, so: StructuredOutputsParams):
    """Compile a request's constraint (kept for its sequences); ValueError when it does not."""
    self.grammars.compile(so)

  def fill_masks(self, rows, out) -> int:
    """Write the token masks of the constrained sequences among `rows` ((sequence, group, row)
    of a step: `runtime.sampling_pack.sampled_rows`) into `out[group, row]`; returns how many.
    Each matcher has consumed every token its sequence generated, none of which is still on the
    device: the mask is that of the token the row samples."""
    todo = []
    for seq, g, r in rows:
      so = seq.params.structured_outputs
      if so is None or seq.finished:
        continue
      if seq.matcher is None:
        seq.matcher = self.grammars.matcher(so)
      if seq.matcher.consumed != len(seq.output_ids):
        raise RuntimeError(f"sequence {seq.seq_id}: its matcher has consumed "
                           f"{seq.matcher.consumed} tokens of {len(seq.output_ids)}")
      todo.append((seq.matcher, g * out.shape[1] + r))
    if todo:
      self.grammars.fill(todo, out.reshape(-1, out.shape[2]))
    return len(todo)

  def banned_ids(self, seq: Sequence) -> list[int]:
    """Ids the device must not sample for this sequence now: its stop ids below min_tokens."""
    if seq.generated < seq.params.min_tokens:
      return sorted(seq.stop_ids)
    return []

  def append(self, seq: Sequence, token: int, lp, capacity: int) -> tuple[str, bool]:
    """Record one sampled token; returns (text delta to emit, finished)."""
    now = self.clock()
    if seq.first_token_time is None:
      seq.first_token_time = now
    out = seq.output_ids
    out.append(token)
    if lp is not None:
      seq.logprobs.append(TokenLogprob(token, lp[0], lp[1]))
    p = seq.params
    reason = None
    n = len(out)
    if token in seq.stop_ids and n >= p.min_tokens:
      reason, seq.stop_reason = "stop", token
    if self.tokenizer is not None:
      reason = self._text(seq, token, reason)
    if seq.matcher is not None and reason is None:
      reason = self._advance(seq, token)
    if reason is None and (n >= p.max_tokens or seq.prompt_len + n >= capacity):
      reason = "length"
    if reason is not None:
      self.finish(seq, reason, now)
    return (self._delta(seq) if self.tokenizer is not None else ""), reason is not None

  def _advance(self, seq: Sequence, token: int) -> str | None:
    """Advance the sequence's matcher: "stop" once its constraint is complete (the text held
    back is let out), "error" if the token broke it (it never should: the mask forbids it)."""
    m = seq.matcher
    if not m.consume(token):
      seq.error = f"structured output: token {token} broke the constraint: {m.error}"
      return "error"
    if not m.done:
      return None
    if self.tokenizer is not None and seq.seq_id in self._detok:
      self._raw[seq.seq_id] += self._detok[seq.seq_id].flush()
      seq.text = self._raw[seq.seq_id]
    return "stop"

  def _text(self, seq: Sequence, token: int, reason: str | None) -> str | None:
    """Detokenize the new token; a stop string it completes ends the sequence."""
    p = seq.params
    before = len(self._raw.get(seq.seq_id, ""))
    self._push_text(seq, token, is_stop_token=reason is not None)
    if reason is None and p.stop and len(seq.output_ids) >= p.min_tokens:
      # search only what the new token can complete (find_stop backs up by the longest stop);
      # from the start every token, long generations would be quadratic
      at = find_stop(self._raw[seq.seq_id], p.stop, before)
      if at >= 0:
        reason = "stop"
        raw = self._raw[seq.seq_id]
        hit = next(s for s in p.stop if raw.startswith(s, at))
        seq.stop_reason = hit
        seq.text = raw[: at + len(hit)] if p.include_stop_str_in_output else raw[:at]
    return reason

  def _push_text(self, seq: Sequence, token: int, is_stop_token: bool):
    d = self._detok.get(seq.seq_id)
    if d is None:
      d = self._detok[seq.seq_id] = IncrementalDetokenizer(
          self.tokenizer, seq.prompt_ids, skip_special=seq.params.skip_special_tokens)
      self._raw[seq.seq_id] = ""
    if not is_stop_token or not seq.params.skip_special_tokens:
      self._raw[seq.seq_id] += d.push(token)
    seq.text = self._raw[seq.seq_id]

  def _delta(self, seq: Sequence) -> str:
    start = self._emitted.get(seq.seq_id, 0)
    end = len(seq.text)
    if not seq.finished and seq.params.stop:
      end -= partial_stop_len(seq.text, seq.params.stop)
    end = max(end, start)
    self._emitted[seq.seq_id] = end
    out = seq.text[start:end]
    if seq.finished:
      self._forget(seq)
    return out

  def finish(self, seq: Sequence, reason: str, now: float | None = None):
    if seq.finished:
      return
    if reason == "length" and self.tokenizer is not None and seq.seq_id in self._detok:
      tail = self._detok[seq.seq_id].flush()
      if not seq.params.stop or find_stop(tail, seq.params.stop) < 0:
        self._raw[seq.seq_id] += tail
        seq.text = self._raw[seq.seq_id]
    seq.status = Status.FINISHED
    seq.finish_reason = reason
    seq.matcher = None
    seq.finish_time = now or self.clock()
    if reason in ("abort", "error"):
      self._forget(seq)

  def _forget(self, seq: Sequence):
    self._detok.pop(seq.seq_id, None)
    self._raw.pop(seq.seq_id, None)
    self._emitted.pop(seq.seq_id, None)
