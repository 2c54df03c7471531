"""The gRPC services: flying-jax's Generation and Admin, and JetStream's Orchestrator.

Handlers run on the asyncio loop and never touch the engine: they hand work to the `EngineLoop`
and await its futures, and stream what its sink delivers. A stream that ends early (client
cancel, disconnect, deadline) aborts its request, which frees its pages before the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid

import grpc

from flying_jax.engine.engine import RequestRejected
from flying_jax.serving import requests as R
from flying_jax.serving.loop import DONE, Draining, QueueFull, StreamItem, Submission
from flying_jax.serving.proto import flying_jax_pb2 as pb
from flying_jax.serving.proto import flying_jax_pb2_grpc as pb_grpc
from flying_jax.serving.proto import jetstream_pb2 as js
from flying_jax.serving.proto import jetstream_pb2_grpc as js_grpc

_ids = itertools.count()


async def _stream(server, context, sub: Submission):
  """Submit `sub` and yield its StreamItems until every sample has finished."""
  queue: asyncio.Queue = asyncio.Queue()
  loop = asyncio.get_running_loop()
  sink = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)
  try:
    await asyncio.wrap_future(server.loop.submit(sub, sink))
  except RequestRejected as e:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
  except QueueFull as e:
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
  except Draining as e:
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
  done = False
  try:
    while True:
      item = await queue.get()
      if item is DONE:
        done = True
        return
      if item.error:
        done = True
        await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {item.error}")
      yield item
  finally:
    if not done:                   # cancelled, disconnected or past its deadline
      server.loop.abort(sub.request_id)


def _request_id(given: str) -> str:
  return given or f"req-{uuid.uuid4().hex[:12]}-{next(_ids)}"


class Generation(pb_grpc.GenerationServicer):
  def __init__(self, server):
    self.server = server

  async def Generate(self, request, context):
    s = self.server
    try:
      prompt = R.prompt_of(request, s.tokenizer, s.vocab, s.limits)
      params = R.sampling_of(request.sampling, s.limits)
      priority = R.priority_of(request)
    except R.BadRequest as e:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    rid = _request_id(request.request_id)
    async for item in _stream(s, context, Submission(rid, prompt.ids, params, priority)):
      yield _response(rid, item)

  async def Tokenize(self, request, context):
    s = self.server
    try:
      if request.WhichOneof("input") == "chat":
        text = R.chat_text(s.tokenizer, request.chat)
      else:
        text = request.text
    except R.BadRequest as e:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    return pb.TokenizeResponse(token_ids=s.tokenizer.encode_prompt(text) if text else [], text=text)

  async def Detokenize(self, request, context):
    s = self.server
    bad = [t for t in request.token_ids if not 0 <= t < s.vocab]
    if bad:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"token ids outside the vocabulary [0, {s.vocab}): {bad[:5]}")
    return pb.DetokenizeResponse(text=s.tokenizer.decode(list(request.token_ids)))

  async def GetServerInfo(self, request, context):
    return self.server.info()

  async def GetStats(self, request, context):
    return await self.server.stats()


class Admin(pb_grpc.AdminServicer):
  """Operator calls; every one checks the admin token first."""

  def __init__(self, server):
    self.server = server

  async def _authorize(self, context):
    token = self.server.config.admin_token
    if not token:
      await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "the admin service is disabled: start the server with --admin-token")
    given = dict(context.invocation_metadata()).get("authorization", "")
    if not given:
      await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "admin calls need metadata 'authorization: Bearer TOKEN'")
    if given != f"Bearer {token}":
      await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong admin token")

  async def _run(self, context, fn, message: str):
    await self._authorize(context)
    try:
      await asyncio.wrap_future(self.server.loop.call(fn))
    except ValueError as e:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except RuntimeError as e:
      await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    return pb.AdminReply(message=message, stats=await self.server.stats())

  async def SetPolicy(self, request, context):
    return await self._run(context, lambda e: e.set_policy(request.policy or None),
                           f"policy set to {request.policy or 'none'}")

  async def PinPartition(self, request, context):
    target = request.partition
    target = int(target) if target.isdigit() else target
    strategy = request.strategy or "drain"
    return await self._run(context, lambda e: e.pin(target, strategy),
                           f"partition {request.partition} pinned ({strategy})")

  async def ReleasePartition(self, request, context):
    policy = self.server.config.policy
    return await self._run(context, lambda e: e.set_policy(policy),
                           f"partition released; policy {policy or 'none'}")

  async def Drain(self, request, context):
    await self._authorize(context)
    await self.server.begin_drain()
    return pb.AdminReply(message="draining: no new requests are admitted",
                         stats=await self.server.stats())


class Orchestrator(js_grpc.OrchestratorServicer):
  """JetStream's contract: greedy decoding (its request has no sampling fields)."""

  def __init__(self, server):
    self.server = server

  async def Decode(self, request, context):
    s = self.server
    try:
      prompt, params = R.jetstream_of(request, s.tokenizer, s.vocab, s.limits)
    except R.BadRequest as e:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    text_mode = prompt.text is not None           # token ids in: token ids out, no text
    n = params.n
    async for item in _stream(s, context, Submission(_request_id(""), prompt.ids, params)):
      samples = [js.DecodeResponse.StreamContent.Sample() for _ in range(n)]
      samples[item.index].token_ids.extend(item.token_ids)
      if text_mode:
        samples[item.index].text = item.text
      yield js.DecodeResponse(stream_content=js.DecodeResponse.StreamContent(samples=samples))

  async def HealthCheck(self, request, context):
    return js.HealthCheckResponse(is_live=self.server.serving)


def _response(rid: str, item: StreamItem) -> pb.GenerateResponse:
  out = pb.GenerateResponse(
      request_id=rid, index=item.index, text=item.text, token_ids=item.token_ids,
      finish_reason=item.finish_reason or "",
      stop_reason="" if item.stop_reason is None else str(item.stop_reason),
      usage=pb.Usage(prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens,
                     cached_prompt_tokens=item.cached_tokens),
      timings=pb.Timings(queue_s=item.queue_s or 0.0, time_to_first_token_s=item.ttft_s or 0.0,
                         elapsed_s=item.elapsed_s))
  for lp in item.logprobs:
    out.logprobs.append(pb.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob,
        top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top]))
  return out
