"""The OpenAI-compatible HTTP API: a FastAPI app over the gRPC server's `EngineLoop`.

`build_app(server)` serves `POST /v1/completions` and `POST /v1/chat/completions` (streamed as
server-sent events or whole), `GET /v1/models`, `GET /health` (503 while draining), `GET
/metrics` (the server's Prometheus registry), `GET /version`, and the admin routes of
`http_admin`. It shares the gRPC server's engine, limits, metrics and drain: a request over HTTP
is one more `Submission` to the same loop. With `ServeConfig.api_key` every `/v1` route wants
`Authorization: Bearer KEY` (vLLM's `--api-key`). Routes run on the gRPC server's asyncio loop
and never touch the engine.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from flying_jax.serving import openai_errors
from flying_jax.serving import openai_protocol as P
from flying_jax.serving.http_admin import admin_router, bearer_ok
from flying_jax.serving.loop import Submission
from flying_jax.serving.openai_errors import ApiError
from flying_jax.serving.openai_responses import Shape
from flying_jax.serving.openai_stream import ClientGone, Run, gather, stream


class _Api:
  """The routes' handlers over one `Server` (its engine loop, tokenizer, limits, config)."""

  def __init__(self, server):
    self.server = server
    self.created = int(time.time())

  @property
  def model(self) -> str:
    return self.server.engine.card.name

  # guards --------------------------------------------------------------------------------------
  async def check_key(self, request: Request):
    key = self.server.config.api_key
    if key and not bearer_ok(request, key):
      raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                     code="invalid_api_key")

  def _check_model(self, model: str | None):
    if model is not None and model != self.model:
      raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                          f"{self.model!r}", "model", "model_not_found")

  def _check_serving(self):
    if not self.server.serving:
      raise ApiError(503, "the server is draining: it admits no new requests")

  # generation ----------------------------------------------------------------------------------
  async def _serve(self, request: Request, body, prompts, params, logprobs, chat: bool):
    """Submit one engine request per prompt and answer: a stream or the whole answer."""
    with_usage = P.include_usage(body)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    subs = [Submission(rid if len(prompts) == 1 else f"{rid}-{k}", p.ids, params)
            for k, p in enumerate(prompts)]
    shape = Shape(self.model, self.server.tokenizer, chat, params.n,
                  bool(body.return_tokens_as_token_ids), bool(body.return_token_ids), rid)
    run = Run(self.server.loop, subs)
    self._check_serving()
    await run.submit()
    if body.stream:
      return stream(run, shape, logprobs is not None, with_usage)
    try:
      return await gather(run, shape, [p.ids for p in prompts], logprobs is not None,
                          request.receive)
    except ClientGone:
      return Response(status_code=499)    # nobody reads it: the connection is closed

  async def completions(self, body: P.CompletionRequest, request: Request):
    s = self.server
    self._check_model(body.model)
    logprobs = P.completion_logprobs(body)
    prompts = P.completion_prompts(body.prompt, s.tokenizer, s.vocab, s.limits)
    params = P.sampling_params(body, s.limits, body.max_tokens, logprobs)
    return await self._serve(request, body, prompts, params, logprobs, chat=False)

  async def chat(self, body: P.ChatCompletionRequest, request: Request):
    s = self.server
    self._check_model(body.model)
    logprobs = P.chat_logprobs(body)
    prompt = P.chat_prompt(body.messages, s.tokenizer, s.vocab, s.limits)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    params = P.sampling_params(body, s.limits, max_tokens, logprobs)
    return await self._serve(request, body, [prompt], params, logprobs, chat=True)

  # reads ---------------------------------------------------------------------------------------
  def _card(self) -> dict:
    return {"id": self.model, "object": "model", "created": self.created,
            "owned_by": "flying-jax", "root": self.model, "parent": None,
            "max_model_len": self.server.engine.card.arch.max_context}

  async def models(self):
    return {"object": "list", "data": [self._card()]}

  async def model_card(self, model: str):
    self._check_model(model)
    return self._card()

  async def health(self):
    if self.server.serving:
      return Response(status_code=200)
    return ApiError(503, "not serving: starting or draining").response()

  async def metrics(self):
    import prometheus_client as prom

    return Response(self.server.metrics.text(), media_type=prom.CONTENT_TYPE_LATEST)

  async def version(self):
    versions = self.server.versions
    return {"version": versions.get("flying-jax", "unknown"), "versions": versions}


def build_app(server) -> FastAPI:
  """The HTTP API of `server` (a `flying_jax.serving.server.Server`)."""
  api = _Api(server)
  app = FastAPI(title="flying-jax", summary="OpenAI-compatible API of a flying-jax server",
                version=server.versions.get("flying-jax", "0"))
  openai_errors.install(app)
  v1 = APIRouter(prefix="/v1", dependencies=[Depends(api.check_key)])
  v1.add_api_route("/completions", api.completions, methods=["POST"], response_model=None)
  v1.add_api_route("/chat/completions", api.chat, methods=["POST"], response_model=None)
  v1.add_api_route("/models", api.models, methods=["GET"])
  v1.add_api_route("/models/{model:path}", api.model_card, methods=["GET"])
  app.include_router(v1)
  app.add_api_route("/health", api.health, methods=["GET"], response_model=None)
  app.add_api_route("/metrics", api.metrics, methods=["GET"], response_model=None)
  app.add_api_route("/version", api.version, methods=["GET"])
  app.include_router(admin_router(server))
  return app


__all__ = ["build_app"]
