"""Per-request sampling parameters, validated once at the edge (vLLM-compatible names and defaults)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Iterable

MAX_LOGPROBS = 20          # most top logprobs a request may ask for; the device always computes this many
SAMPLING_EPS = 1e-5        # temperatures below this sample greedily (vLLM's `_SAMPLING_EPS`)


def _as_tuple(value, name: str) -> tuple:
  """A list / tuple / single string (for `stop`) as a tuple; anything else is a ValueError."""
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  if isinstance(value, Iterable):
    return tuple(value)
  raise ValueError(f"{name} must be a list or tuple, got {type(value).__name__}")


def _is_int(x) -> bool:
  """An integer (Python or NumPy), but not a bool."""
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
  """A constraint on the text a request generates (vLLM's `StructuredOutputsParams`): exactly one
  of `json` (a JSON Schema, as a dict or JSON text), `json_object` (any JSON object), `regex`,
  `grammar` (a Lark grammar, llguidance's dialect) or `choice` (one of these strings). The
  sampler masks every token that would leave the constraint (`flying_jax.sampling.structured`).

  `json` is stored as JSON text (the dataclass stays hashable), its keys in the order given: the
  order of a schema's `properties` is the order the output writes them in. A schema that is not
  JSON, or a constraint no grammar compiler accepts, is refused when the request is added."""

  json: str | dict | None = None
  regex: str | None = None
  choice: tuple[str, ...] | None = None
  grammar: str | None = None
  json_object: bool = False

  def __post_init__(self):
    if isinstance(self.json, (dict, list, bool)):
      object.__setattr__(self, "json", json.dumps(self.json))
    elif self.json is not None:
      if not isinstance(self.json, str):
        raise ValueError(f"structured output: json must be a JSON Schema (a dict or JSON text), "
                         f"got {type(self.json).__name__}")
      try:
        json.loads(self.json)
      except ValueError as e:
        raise ValueError(f"structured output: the JSON Schema is not valid JSON: {e}") from None
    if self.choice is not None:
      choice = _as_tuple(self.choice, "choice")
      if not choice or not all(isinstance(c, str) and c for c in choice):
        raise ValueError("structured output: choice must be a non-empty list of non-empty strings")
      object.__setattr__(self, "choice", choice)
    for name in ("regex", "grammar"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, str) or not v):
        raise ValueError(f"structured output: {name} must be a non-empty string")
    if not isinstance(self.json_object, bool):
      raise ValueError("structured output: json_object must be true or false")
    given = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
    given += ["json_object"] if self.json_object else []
    if len(given) != 1:
      raise ValueError(f"structured output takes exactly one of json, json_object, regex, "
                       f"grammar, choice; got {given or 'none'}")

  @property
  def kind(self) -> str:
    """Which constraint: "json", "json_object", "regex", "grammar" or "choice"."""
    if self.json_object:
      return "json_object"
    return next(n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick the tokens of one request; field names and defaults follow vLLM's `SamplingParams`.

  `top_k` of 0 or -1 means no top-k filter (stored as 0). `logprobs` is the number of top logprobs to
  return per generated token (None: none; 0: only the chosen token's). `stop` and `stop_token_ids`
  accept lists and are stored as tuples. Violations raise ValueError.
  """

  n: int = 1
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  min_p: float = 0.0
  seed: int | None = None
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  stop: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False
  max_tokens: int = 16
  min_tokens: int = 0
  logprobs: int | None = None
  skip_special_tokens: bool = True
  include_stop_str_in_output: bool = False
  structured_outputs: StructuredOutputsParams | None = None

  def __post_init__(self):
    object.__setattr__(self, "stop", _as_tuple(self.stop, "stop"))
    object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids"))
    if self.top_k == -1:
      object.__setattr__(self, "top_k", 0)
    self._check_counts()
    self._check_filters()
    self._check_penalties()
    self._check_stops()
    if self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                StructuredOutputsParams):
      raise ValueError("structured_outputs must be a StructuredOutputsParams")

  def _check_counts(self):
    """n, max_tokens, min_tokens, logprobs, seed."""
    if not _is_int(self.n) or self.n < 1:
      raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
    if not _is_int(self.max_tokens) or self.max_tokens < 1:
      raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
    if not _is_int(self.min_tokens) or self.min_tokens < 0:
      raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
    if self.min_tokens > self.max_tokens:
      raise ValueError(f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
    if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
      raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
    if self.seed is not None and not _is_int(self.seed):
      raise ValueError(f"seed must be None or an integer, got {self.seed!r}")

  def _check_filters(self):
    """temperature, top_p, top_k, min_p (written so that NaN fails too)."""
    if not 0.0 <= self.temperature < math.inf:
      raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if not _is_int(self.top_k) or self.top_k < -1:
      raise ValueError(f"top_k must be -1 or 0 (off) or a positive integer, got {self.top_k!r}")
    if not 0.0 <= self.min_p <= 1.0:
      raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

  def _check_penalties(self):
    """repetition, presence and frequency penalties."""
    if not 0.0 < self.repetition_penalty < math.inf:
      raise ValueError(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
    if not -2.0 <= self.presence_penalty <= 2.0:
      raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
    if not -2.0 <= self.frequency_penalty <= 2.0:
      raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")

  def _check_stops(self):
    """stop strings and stop token ids."""
    for s in self.stop:
      if not isinstance(s, str) or not s:
        raise ValueError(f"stop entries must be non-empty strings, got {s!r}")
    for t in self.stop_token_ids:
      if not _is_int(t) or t < 0:
        raise ValueError(f"stop_token_ids entries must be integers >= 0, got {t!r}")

  @property
  def greedy(self) -> bool:
    """True when the request always takes the most likely token (temperature 0 or top_k 1)."""
    return self.temperature < SAMPLING_EPS or self.top_k == 1

  @property
  def has_penalties(self) -> bool:
    """True when any of the repetition / presence / frequency penalties changes the logits."""
    return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0)

  @classmethod
  def greedy_params(cls, max_tokens: int = 16, **kwargs) -> SamplingParams:
    """Greedy decoding (temperature 0) of up to `max_tokens` tokens; other fields from `kwargs`."""
    return cls(temperature=0.0, max_tokens=max_tokens, **kwargs)
