"""The HTTP API's answers in OpenAI's shapes: completions and chat completions, whole or as
server-sent-event chunks, with usage and logprobs.

`Shape` holds what every chunk of one call repeats (id, created, model, which endpoint) and turns
the engine's `StreamItem`s into choices; `Choice` gathers one choice's items for a whole answer.
A choice's index is `prompt * n + sample`, as vLLM numbers the choices of a multi-prompt
completion. Logprobs follow each endpoint's format: the completions API's parallel lists
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), the chat API's `content` entries
with bytes. A token is shown as its text, or as `token_id:N` when the request asks
(`return_tokens_as_token_ids`, vLLM's option), which is the only lossless form for byte pieces.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid

from flying_jax.engine.sequence import TokenLogprob
from flying_jax.serving.loop import StreamItem

_FLOOR = -9999.0                # a -inf logprob (a masked token) as JSON can carry it


def _finite(x: float) -> float:
  return x if math.isfinite(x) else _FLOOR


def sse(obj) -> str:
  """One server-sent event carrying `obj` as JSON."""
  return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens,
          "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclasses.dataclass
class Choice:
  """One choice of a whole (non-streamed) answer, gathered item by item."""
  index: int
  texts: list[str] = dataclasses.field(default_factory=list)
  token_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  stop_reason: int | str | None = None
  completion_tokens: int = 0

  def add(self, item: StreamItem):
    self.texts.append(item.text)
    self.token_ids += item.token_ids
    self.logprobs += item.logprobs
    self.completion_tokens = item.completion_tokens
    if item.finish_reason is not None:
      self.finish_reason, self.stop_reason = item.finish_reason, item.stop_reason


class Shape:
  """The answers of one call. `chat` picks the endpoint; `n` the samples per prompt."""

  def __init__(self, model: str, tokenizer, chat: bool, n: int, token_ids_as_tokens: bool,
               return_token_ids: bool, answer_id: str | None = None):
    self.model, self.tokenizer, self.chat, self.n = model, tokenizer, chat, n
    self.as_ids, self.return_ids = token_ids_as_tokens, return_token_ids
    self.id = answer_id or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    self.created = int(time.time())
    self._offsets: dict[int, int] = {}     # completions: text offset of each choice's next token

  def index(self, prompt: int, item: StreamItem) -> int:
    return prompt * self.n + item.index

  # tokens and logprobs ---------------------------------------------------------------------
  def token(self, token_id: int) -> str:
    return f"token_id:{token_id}" if self.as_ids else self.tokenizer.decode([token_id])

  def _completion_logprobs(self, index: int, lps: list[TokenLogprob]) -> dict:
    tokens = [self.token(lp.token_id) for lp in lps]
    offsets, at = [], self._offsets.get(index, 0)
    for t in tokens:
      offsets.append(at)
      at += len(t)
    self._offsets[index] = at
    tops = []
    for lp in lps:
      top: dict[str, float] = {}
      for t, p in lp.top:                # most likely first: a repeated text keeps the first
        top.setdefault(self.token(t), _finite(p))
      tops.append(top)
    return {"tokens": tokens, "token_logprobs": [_finite(lp.logprob) for lp in lps],
            "top_logprobs": tops, "text_offset": offsets}

  def _entry(self, token_id: int, logprob: float) -> dict:
    t = self.token(token_id)
    return {"token": t, "logprob": _finite(logprob), "bytes": list(t.encode("utf-8"))}

  def _chat_logprobs(self, lps: list[TokenLogprob]) -> dict:
    return {"content": [{**self._entry(lp.token_id, lp.logprob),
                         "top_logprobs": [self._entry(t, p) for t, p in lp.top]} for lp in lps]}

  def logprobs(self, index: int, lps: list[TokenLogprob], asked: bool) -> dict | None:
    if not asked:
      return None
    return self._chat_logprobs(lps) if self.chat else self._completion_logprobs(index, lps)

  # streamed chunks -------------------------------------------------------------------------
  def _chunk(self, choices: list[dict], **extra) -> dict:
    obj = "chat.completion.chunk" if self.chat else "text_completion"
    return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
            "choices": choices, **extra}

  def role_chunk(self, index: int, with_usage: bool) -> dict:
    """The chat stream's first chunk of a choice: the assistant's role."""
    choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
              "finish_reason": None}
    return self._chunk([choice], **({"usage": None} if with_usage else {}))

  def chunk(self, index: int, item: StreamItem, logprobs: bool, with_usage: bool) -> dict:
    """One item of one choice as a chunk (finish_reason on the choice's last)."""
    lps = self.logprobs(index, item.logprobs, logprobs)
    choice: dict = {"index": index}
    if self.chat:
      choice["delta"] = {"content": item.text} if item.text else {}
    else:
      choice["text"] = item.text
    choice.update(logprobs=lps, finish_reason=item.finish_reason,
                  stop_reason=item.stop_reason if item.finish_reason else None)
    if self.return_ids:
      choice["token_ids"] = list(item.token_ids)
    return self._chunk([choice], **({"usage": None} if with_usage else {}))

  def usage_chunk(self, totals: dict) -> dict:
    """The last chunk when `stream_options.include_usage`: no choices, the usage."""
    return self._chunk([], usage=totals)

  # whole answers ---------------------------------------------------------------------------
  def answer(self, choices: list[Choice], prompt_ids: list[list[int]], totals: dict,
             logprobs: bool) -> dict:
    out = []
    for c in sorted(choices, key=lambda c: c.index):
      text = "".join(c.texts)
      body: dict = {"index": c.index}
      if self.chat:
        body["message"] = {"role": "assistant", "content": text}
      else:
        body["text"] = text
      body.update(logprobs=self.logprobs(c.index, c.logprobs, logprobs),
                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)
      if self.return_ids:
        body["token_ids"] = c.token_ids
        if not self.chat:
          body["prompt_token_ids"] = prompt_ids[c.index // self.n]
      out.append(body)
    obj = "chat.completion" if self.chat else "text_completion"
    answer = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
              "choices": out, "usage": totals}
    if self.chat and self.return_ids:
      answer["prompt_token_ids"] = prompt_ids[0]
    return answer


__all__ = ["Choice", "SSE_DONE", "Shape", "sse", "usage"]
