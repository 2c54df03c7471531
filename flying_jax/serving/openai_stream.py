"""The engine requests behind one HTTP call, and how their items reach the client: streamed as
server-sent events or gathered into one answer; either way aborted when the client goes away.

A call holds one engine request per prompt (a completion may send several), all fed into one
asyncio queue by the `EngineLoop`'s sinks. A request that ends before its `DONE` (the client
disconnected, the server shut down, a step failed) is aborted through `EngineLoop.abort`, which
frees its pages before the next step. A streamed call notices a disconnect because Starlette
cancels the response's iterator; a whole answer has no iterator to cancel, so `gather` watches
the connection itself while it waits.
"""

from __future__ import annotations

import asyncio
import dataclasses

from starlette.responses import StreamingResponse

from flying_jax.engine.engine import RequestRejected
from flying_jax.serving.loop import DONE, Draining, QueueFull, StreamItem, Submission
from flying_jax.serving.openai_errors import ApiError
from flying_jax.serving.openai_responses import SSE_DONE, Choice, Shape, sse, usage


class ClientGone(Exception):
  """The client closed the connection before the answer was ready."""


class Run:
  """The engine requests of one call, merged into one stream of (prompt number, item)."""

  def __init__(self, loop, subs: list[Submission]):
    self.loop, self.subs = loop, subs
    self._queue: asyncio.Queue = asyncio.Queue()
    self._open: set[int] = set()

  async def submit(self):
    """Queue every request; any refusal aborts those already queued and is raised as the
    HTTP status that names it."""
    aio = asyncio.get_running_loop()
    for k, sub in enumerate(self.subs):
      sink = lambda item, k=k: aio.call_soon_threadsafe(self._queue.put_nowait, (k, item))
      try:
        await asyncio.wrap_future(self.loop.submit(sub, sink))
      except RequestRejected as e:
        raise self._refused(400, str(e)) from None
      except QueueFull as e:
        raise self._refused(429, str(e)) from None
      except Draining as e:
        raise self._refused(503, str(e)) from None
      except BaseException:
        self.abort()
        raise
      self._open.add(k)

  def _refused(self, status: int, message: str) -> ApiError:
    self.abort()
    return ApiError(status, message)

  async def items(self):
    """(prompt number, StreamItem) until every request is done; a failed or aborted sample
    ends the call with a 500."""
    while self._open:
      k, item = await self._queue.get()
      if item is DONE:
        self._open.discard(k)
        continue
      if item.error or item.finish_reason in ("abort", "error"):
        self._open.discard(k)             # the engine loop has forgotten it already
        self.abort()
        raise ApiError(500, f"generation failed: {item.error or item.finish_reason}")
      yield k, item

  def abort(self):
    """Abort every request not done yet (a no-op once all are)."""
    for k in sorted(self._open):
      self.loop.abort(self.subs[k].request_id)
    self._open.clear()


@dataclasses.dataclass
class Tally:
  """Usage of a call: the prompt counted once per prompt, completions per choice."""
  prompt: dict[int, int] = dataclasses.field(default_factory=dict)
  cached: dict[int, int] = dataclasses.field(default_factory=dict)
  completion: dict[int, int] = dataclasses.field(default_factory=dict)

  def add(self, k: int, index: int, item: StreamItem):
    self.prompt[k] = item.prompt_tokens
    self.cached[k] = max(self.cached.get(k, 0), item.cached_tokens)
    self.completion[index] = item.completion_tokens

  def usage(self) -> dict:
    return usage(sum(self.prompt.values()), sum(self.completion.values()),
                 sum(self.cached.values()))


async def _events(run: Run, shape: Shape, logprobs: bool, with_usage: bool):
  tally = Tally()
  try:
    if shape.chat:
      for index in range(len(run.subs) * shape.n):
        yield sse(shape.role_chunk(index, with_usage))
    async for k, item in run.items():
      index = shape.index(k, item)
      tally.add(k, index, item)
      if item.token_ids or item.text or item.finish_reason:
        yield sse(shape.chunk(index, item, logprobs, with_usage))
    if with_usage:
      yield sse(shape.usage_chunk(tally.usage()))
  except ApiError as e:                    # after the headers: the error is the last event
    yield sse(e.body())
  finally:
    run.abort()                            # cancelled (client gone) or closed early
  yield SSE_DONE


class _Events(StreamingResponse):
  """A stream that closes its iterator however the response ends, so that a client that goes
  away between two events (the iterator parked at a `yield`, not cancelled) still aborts."""

  async def __call__(self, scope, receive, send):
    try:
      await super().__call__(scope, receive, send)
    finally:
      await self.body_iterator.aclose()


def stream(run: Run, shape: Shape, logprobs: bool, with_usage: bool) -> StreamingResponse:
  return _Events(_events(run, shape, logprobs, with_usage), media_type="text/event-stream",
                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _until_disconnected(receive):
  while (await receive())["type"] != "http.disconnect":
    pass


async def gather(run: Run, shape: Shape, prompt_ids: list[list[int]], logprobs: bool,
                 receive) -> dict:
  """The whole answer; raises ClientGone (after aborting) when the client disconnects first."""
  choices: dict[int, Choice] = {}
  tally = Tally()

  async def consume():
    async for k, item in run.items():
      index = shape.index(k, item)
      tally.add(k, index, item)
      choices.setdefault(index, Choice(index)).add(item)

  work = asyncio.ensure_future(consume())
  watch = asyncio.ensure_future(_until_disconnected(receive))
  try:
    await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    if not work.done():
      raise ClientGone()
    work.result()                          # an ApiError of a failed sample
  finally:
    watch.cancel()
    work.cancel()
    run.abort()
  return shape.answer(list(choices.values()), prompt_ids, tally.usage(), logprobs)


__all__ = ["ClientGone", "Run", "Tally", "gather", "stream"]
