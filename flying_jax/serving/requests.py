"""Requests off the wire: prompts and sampling fields checked and turned into engine inputs.

Everything here raises `BadRequest` (INVALID_ARGUMENT) with a message that names the field.
"""

from __future__ import annotations

import dataclasses

from flying_jax.sampling import SamplingParams, StructuredOutputsParams
from flying_jax.serving.proto import flying_jax_pb2 as pb
from flying_jax.serving.proto import jetstream_pb2 as js


class BadRequest(ValueError):
  """A request that cannot be served as sent (INVALID_ARGUMENT)."""


@dataclasses.dataclass(frozen=True)
class Limits:
  max_prompt_tokens: int        # longer prompts are refused
  default_max_tokens: int = 64  # when a request does not say


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str | None              # None when the client sent token ids
  ids: list[int]


def _check_ids(ids, vocab: int, limits: Limits, what: str) -> list[int]:
  ids = [int(t) for t in ids]
  if not ids:
    raise BadRequest(f"{what} is empty")
  bad = [t for t in ids if not 0 <= t < vocab]
  if bad:
    raise BadRequest(f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
  if len(ids) > limits.max_prompt_tokens:
    raise BadRequest(f"{what} has {len(ids)} tokens; this server takes at most "
                     f"{limits.max_prompt_tokens}")
  return ids


def _encode(tokenizer, text: str, vocab: int, limits: Limits, what: str) -> Prompt:
  if not text:
    raise BadRequest(f"{what} is empty")
  if len(text) > 8 * limits.max_prompt_tokens:     # no tokenizer work on absurd inputs
    raise BadRequest(f"{what} has {len(text)} characters; this server takes at most "
                     f"{limits.max_prompt_tokens} tokens")
  return Prompt(text, _check_ids(tokenizer.encode_prompt(text), vocab, limits, what))


def prompt_of(req: pb.GenerateRequest, tokenizer, vocab: int, limits: Limits) -> Prompt:
  kind = req.WhichOneof("prompt")
  if kind is None:
    raise BadRequest("the request has no prompt: set text, chat or token_ids")
  if kind == "token_ids":
    return Prompt(None, _check_ids(req.token_ids.ids, vocab, limits, "token_ids"))
  if kind == "chat":
    return _encode(tokenizer, chat_text(tokenizer, req.chat), vocab, limits, "the chat")
  return _encode(tokenizer, req.text, vocab, limits, "the prompt")


def chat_text(tokenizer, chat: pb.Chat) -> str:
  if not chat.messages:
    raise BadRequest("the chat has no messages")
  roles = {"system", "user", "assistant", "tool"}
  for m in chat.messages:
    if m.role not in roles:
      raise BadRequest(f"chat role {m.role!r} is not one of {sorted(roles)}")
  try:
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.content}
                                          for m in chat.messages])
  except ValueError as e:             # e.g. a model without a chat template (TokenizerError)
    raise BadRequest(f"the chat: {e}") from None


def sampling_of(s: pb.Sampling, limits: Limits) -> SamplingParams:
  """The offline API's SamplingParams from the proto (unset fields: its defaults)."""
  kw = dict(n=s.n or 1, top_k=s.top_k, min_p=s.min_p, min_tokens=s.min_tokens,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
            include_stop_str_in_output=s.include_stop_str_in_output,
            max_tokens=s.max_tokens if s.HasField("max_tokens") else limits.default_max_tokens)
  for name in ("temperature", "top_p", "seed", "repetition_penalty", "logprobs"):
    if s.HasField(name):
      kw[name] = getattr(s, name)
  try:
    if s.HasField("structured"):
      kw["structured_outputs"] = structured_of(s.structured)
    return SamplingParams(**kw)
  except (ValueError, TypeError) as e:
    raise BadRequest(f"sampling: {e}") from None


def structured_of(so: pb.StructuredOutput) -> StructuredOutputsParams:
  """The constraint of `Sampling.structured` (ValueError when none is set or it is malformed;
  whether it compiles is the engine's check, when the request is added)."""
  kind = so.WhichOneof("constraint")
  if kind is None:
    raise ValueError("structured output: set one of json_schema, json_object, regex, grammar, "
                     "choice")
  if kind == "json_schema":
    return StructuredOutputsParams(json=so.json_schema)
  if kind == "choice":
    return StructuredOutputsParams(choice=tuple(so.choice.choices))
  return StructuredOutputsParams(**{kind: getattr(so, kind)})


def priority_of(req: pb.GenerateRequest) -> int:
  if req.priority < 0:
    raise BadRequest(f"priority must be >= 0, got {req.priority}")
  interactive = req.latency_class == pb.LATENCY_CLASS_INTERACTIVE
  return max(req.priority, 1 if interactive else 0)


def jetstream_of(req: js.DecodeRequest, tokenizer, vocab: int,
                 limits: Limits) -> tuple[Prompt, SamplingParams]:
  """JetStream's Decode: greedy (JetStream's request has no sampling fields), num_samples."""
  if req.lora_adapter_id:
    raise BadRequest(f"LoRA adapter {req.lora_adapter_id!r}: this server serves no adapters")
  kind = req.WhichOneof("content")
  if kind is None:
    raise BadRequest("the request has no content: set text_content or token_content")
  if kind == "token_content":
    prompt = Prompt(None, _check_ids(req.token_content.token_ids, vocab, limits, "token_content"))
  else:
    prompt = _encode(tokenizer, req.text_content.text, vocab, limits, "text_content")
  if req.max_tokens < 0 or req.num_samples < 0:
    raise BadRequest("max_tokens and num_samples must be >= 0")
  try:
    params = SamplingParams(temperature=0.0, n=req.num_samples or 1,
                            max_tokens=req.max_tokens or limits.default_max_tokens)
  except ValueError as e:
    raise BadRequest(str(e)) from None
  return prompt, params
