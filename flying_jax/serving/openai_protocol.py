"""OpenAI's request bodies (completions, chat completions) and what they become for the engine.

The bodies are pydantic models that refuse unknown fields (a misspelt `max_token` would otherwise
be ignored in silence); vLLM's extra sampling fields are accepted beside OpenAI's. Prompts go
through the same checks as the gRPC API's (`requests.py`: empty, too long, outside the
vocabulary, the chat template), sampling fields become a `SamplingParams` whose own checks name
the bad value, and the structured-output fields (OpenAI's `response_format`, vLLM's
`structured_outputs` and older `guided_*`) a `StructuredOutputsParams`. Every refusal is a 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flying_jax.sampling import SamplingParams, StructuredOutputsParams
from flying_jax.serving import requests as R
from flying_jax.serving.openai_errors import bad_request
from flying_jax.serving.proto import flying_jax_pb2 as pb


class _Body(BaseModel):
  model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StreamOptions(_Body):
  include_usage: bool | None = False


class JsonSchemaFormat(_Body):
  name: str | None = None
  description: str | None = None
  json_schema: dict[str, Any] | bool | None = Field(default=None, alias="schema")
  strict: bool | None = None


class ResponseFormat(_Body):
  type: Literal["text", "json_object", "json_schema"]
  json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
  json_: dict[str, Any] | str | None = Field(default=None, alias="json")
  regex: str | None = None
  choice: list[str] | None = None
  grammar: str | None = None
  json_object: bool | None = None


class _Sampling(_Body):
  """The fields both endpoints share; None: the default (OpenAI's, else the server's)."""
  model: str | None = None
  n: int | None = None
  stop: str | list[str] | None = None
  max_tokens: int | None = None
  temperature: float | None = None
  top_p: float | None = None
  seed: int | None = None
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  logit_bias: dict[str, float] | None = None
  stream: bool | None = False
  stream_options: StreamOptions | None = None
  user: str | None = None                           # accepted, not used
  response_format: ResponseFormat | None = None
  # vLLM's extra sampling fields
  top_k: int | None = None
  min_p: float | None = None
  repetition_penalty: float | None = None
  min_tokens: int | None = None
  ignore_eos: bool | None = None
  stop_token_ids: list[int] | None = None
  include_stop_str_in_output: bool | None = None
  skip_special_tokens: bool | None = None
  structured_outputs: StructuredOutputs | None = None
  guided_json: dict[str, Any] | str | None = None
  guided_regex: str | None = None
  guided_choice: list[str] | None = None
  guided_grammar: str | None = None
  # vLLM's output options: token ids as "token_id:N" in logprobs; the ids themselves
  return_tokens_as_token_ids: bool | None = False
  return_token_ids: bool | None = False


class CompletionRequest(_Sampling):
  prompt: Any = None                                # checked by `completion_prompts`
  logprobs: int | None = None
  echo: bool | None = False
  best_of: int | None = None
  suffix: str | None = None


class ChatMessage(_Body):
  role: str
  content: Any = None                               # a string or text parts; checked below
  name: str | None = None


class ChatCompletionRequest(_Sampling):
  messages: list[ChatMessage]
  max_completion_tokens: int | None = None
  logprobs: bool | None = False
  top_logprobs: int | None = None


# prompts ---------------------------------------------------------------------------------------
def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _checked(build, tokenizer, vocab: int, limits: R.Limits, param: str) -> R.Prompt:
  """The prompt of the gRPC request `build()` makes, checked as the gRPC API checks it."""
  try:
    return R.prompt_of(build(), tokenizer, vocab, limits)
  except UnicodeError:                     # a lone surrogate ("\ud800") has no UTF-8
    raise bad_request(f"{param} is not valid Unicode text", param) from None
  except ValueError as e:                  # BadRequest, or the tokenizer's (no chat template)
    raise bad_request(str(e), param) from None


def _ids_prompt(ids: list[int], tokenizer, vocab: int, limits: R.Limits) -> R.Prompt:
  bad = [t for t in ids if not 0 <= t < vocab]
  if bad:                                  # before the proto, whose ids are int32
    raise bad_request(f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}", "prompt")
  return _checked(lambda: pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids)), tokenizer, vocab,
                  limits, "prompt")


def completion_prompts(prompt, tokenizer, vocab: int, limits: R.Limits) -> list[R.Prompt]:
  """OpenAI's four prompt forms: a string, strings, token ids, lists of token ids."""
  text = lambda t: _checked(lambda: pb.GenerateRequest(text=t), tokenizer, vocab, limits,
                            "prompt")
  if prompt is None:
    raise bad_request("the request has no prompt", "prompt")
  if isinstance(prompt, str):
    return [text(prompt)]
  if isinstance(prompt, list) and prompt:
    if all(isinstance(p, str) for p in prompt):
      return [text(p) for p in prompt]
    if all(_is_int(t) for t in prompt):
      return [_ids_prompt(prompt, tokenizer, vocab, limits)]
    if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
      return [_ids_prompt(p, tokenizer, vocab, limits) for p in prompt]
  if isinstance(prompt, list) and not prompt:
    raise bad_request("the prompt is empty", "prompt")
  raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list "
                    "of lists of token ids", "prompt")


def _content(m: ChatMessage, i: int) -> str:
  """A message's text: a string, or OpenAI's content parts of type text joined."""
  if m.content is None:
    return ""
  if isinstance(m.content, str):
    return m.content
  if isinstance(m.content, list):
    texts = []
    for part in m.content:
      if not (isinstance(part, dict) and part.get("type") == "text"
              and isinstance(part.get("text"), str)):
        raise bad_request("only text content parts ({\"type\": \"text\", \"text\": ...}) are "
                          "supported", f"messages.{i}.content")
      texts.append(part["text"])
    return "".join(texts)
  raise bad_request("content must be a string or a list of text parts", f"messages.{i}.content")


def chat_prompt(messages: list[ChatMessage], tokenizer, vocab: int,
                limits: R.Limits) -> R.Prompt:
  """The conversation through the model's chat template, checked as the gRPC chat is.
  OpenAI's `developer` role is its new name for `system`."""
  turns = [("system" if m.role == "developer" else m.role, _content(m, i))
           for i, m in enumerate(messages)]
  build = lambda: pb.GenerateRequest(chat=pb.Chat(
      messages=[pb.ChatMessage(role=r, content=c) for r, c in turns]))
  return _checked(build, tokenizer, vocab, limits, "messages")


# sampling --------------------------------------------------------------------------------------
_PASSED = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k",
           "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
           "include_stop_str_in_output", "skip_special_tokens")
_FIELDS = frozenset(_PASSED) | {"n", "stop", "max_tokens", "logprobs"}


def sampling_params(req: _Sampling, limits: R.Limits, max_tokens: int | None,
                    logprobs: int | None) -> SamplingParams:
  """The engine's SamplingParams: fields the request leaves out keep vLLM's defaults;
  max_tokens the server's `--default-max-tokens`."""
  if req.logit_bias:
    raise bad_request("logit_bias is not supported", "logit_bias")
  kw = {name: getattr(req, name) for name in _PASSED if getattr(req, name) is not None}
  kw.update(n=1 if req.n is None else req.n, stop=req.stop, logprobs=logprobs,
            max_tokens=limits.default_max_tokens if max_tokens is None else max_tokens,
            structured_outputs=structured_outputs(req))
  try:
    return SamplingParams(**kw)
  except (TypeError, ValueError) as e:
    word = str(e).split(" ", 1)[0]                # SamplingParams' messages start with the field
    raise bad_request(str(e), word if word in _FIELDS else None) from None


def structured_outputs(req: _Sampling) -> StructuredOutputsParams | None:
  """The one output constraint the request names (None: free text)."""
  given = []
  rf = req.response_format
  if rf is not None and rf.type == "json_object":
    given.append(("response_format", dict(json_object=True)))
  elif rf is not None and rf.type == "json_schema":
    schema = rf.json_schema.json_schema if rf.json_schema is not None else None
    if schema is None:
      raise bad_request("response_format of type json_schema needs json_schema.schema",
                        "response_format")
    given.append(("response_format", dict(json=schema)))
  so = req.structured_outputs
  if so is not None:
    given.append(("structured_outputs", dict(
        json=so.json_, regex=so.regex, grammar=so.grammar, json_object=bool(so.json_object),
        choice=None if so.choice is None else tuple(so.choice))))
  for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                    ("guided_grammar", "grammar"), ("guided_choice", "choice")):
    value = getattr(req, name)
    if value is not None:
      given.append((name, {key: tuple(value) if key == "choice" else value}))
  if not given:
    return None
  if len(given) > 1:
    raise bad_request(f"give one output constraint, not {len(given)}: "
                      f"{', '.join(name for name, _ in given)}", given[1][0])
  name, kw = given[0]
  try:
    return StructuredOutputsParams(**kw)
  except (TypeError, ValueError) as e:
    raise bad_request(str(e), name) from None


def completion_logprobs(req: CompletionRequest) -> int | None:
  if req.echo:
    raise bad_request("echo is not supported", "echo")
  if req.suffix:
    raise bad_request("suffix is not supported", "suffix")
  if req.best_of is not None and req.best_of != (req.n or 1):
    raise bad_request("best_of must equal n (no server-side ranking)", "best_of")
  return req.logprobs


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
  if req.top_logprobs is not None and not req.logprobs:
    raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
  return (req.top_logprobs or 0) if req.logprobs else None


def include_usage(req: _Sampling) -> bool:
  if req.stream_options is not None and not req.stream:
    raise bad_request("stream_options is only allowed when stream is true", "stream_options")
  return bool(req.stream_options and req.stream_options.include_usage)


__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "ResponseFormat",
           "StreamOptions", "StructuredOutputs", "chat_logprobs", "chat_prompt",
           "completion_logprobs", "completion_prompts", "include_usage", "sampling_params",
           "structured_outputs"]
