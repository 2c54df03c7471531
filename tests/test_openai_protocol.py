"""The OpenAI-compatible API's request parsing, without a server: the structured-output fields
and vLLM's sampling extras as the engine receives them, and the `serve` flags of the HTTP API.
(What the server answers is tests/test_openai_api.py.)"""

import pytest

from flying_jax import cli
from flying_jax.sampling import StructuredOutputsParams
from flying_jax.serving import openai_protocol as P
from flying_jax.serving.openai_errors import ApiError
from flying_jax.serving.requests import Limits


def test_structured_output_fields_map_onto_the_params():
  parse = lambda **kw: P.structured_outputs(P.CompletionRequest(prompt="x", **kw))
  schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
  assert parse(response_format={"type": "json_schema", "json_schema": {
      "name": "a", "schema": schema, "strict": True}}) == StructuredOutputsParams(json=schema)
  assert parse(response_format={"type": "json_object"}) == \
      StructuredOutputsParams(json_object=True)
  assert parse(response_format={"type": "text"}) is None and parse() is None
  assert parse(structured_outputs={"choice": ["yes", "no"]}) == \
      StructuredOutputsParams(choice=("yes", "no"))
  assert parse(structured_outputs={"json": schema}) == StructuredOutputsParams(json=schema)
  assert parse(guided_regex="[a-z]+") == StructuredOutputsParams(regex="[a-z]+")
  assert parse(guided_grammar="start: \"a\"") == StructuredOutputsParams(grammar="start: \"a\"")
  assert parse(guided_choice=["a"]) == StructuredOutputsParams(choice=("a",))
  with pytest.raises(ApiError, match="one output constraint"):
    parse(guided_regex="a", response_format={"type": "json_object"})
  limits = Limits(100, 16)
  params = P.sampling_params(P.ChatCompletionRequest(
      messages=[{"role": "user", "content": "x"}], guided_json=schema, top_k=5, min_p=0.1,
      repetition_penalty=1.1, min_tokens=2, ignore_eos=True, stop_token_ids=[3],
      include_stop_str_in_output=True), limits, None, None)
  assert params.structured_outputs == StructuredOutputsParams(json=schema)
  assert (params.top_k, params.min_p, params.repetition_penalty, params.min_tokens,
          params.ignore_eos, params.stop_token_ids, params.include_stop_str_in_output,
          params.max_tokens) == (5, 0.1, 1.1, 2, True, (3,), True, 16)


def test_serve_flags():
  args = cli.build_parser().parse_args(["serve", "--http-port", "8000", "--http-host", "0.0.0.0",
                                        "--api-key", "k"])
  assert (args.http_port, args.http_host, args.api_key) == (8000, "0.0.0.0", "k")
  assert cli.build_parser().parse_args(["serve"]).http_port is None
