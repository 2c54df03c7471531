"""Malformed messages get INVALID_ARGUMENT, for every method of every service.

gRPC's Python server turns a request that fails to deserialize (invalid UTF-8 in a string field,
corrupt wire bytes, an overlong varint, a truncated message) into UNKNOWN with a traceback in the
server's log. `RejectMalformed` wraps each method's deserializer so that a decode error becomes a
marker instead of an exception, and each method's behaviour so that the marker is answered with
INVALID_ARGUMENT naming the message type, before any handler code runs. Streamed requests are
checked one message at a time.
"""

from __future__ import annotations

import contextlib
import inspect

import grpc
from google.protobuf.message import DecodeError


class _Malformed:
  __slots__ = ("what",)

  def __init__(self, what: str):
    self.what = what


def _checked_deserializer(deserialize):
  def run(data: bytes):
    try:
      return deserialize(data)
    except DecodeError as e:
      return _Malformed(str(e))
  return run


async def _refuse(context, bad: _Malformed):
  await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"malformed request message ({bad.what}): invalid UTF-8 in a string field, "
                      f"corrupt wire bytes or a truncated message")


def _wrap(behavior, streaming_request: bool):
  """`behavior` (an async generator function or a coroutine function) refusing malformed
  requests first."""
  def checked(requests, context):
    async def each():
      async for request in requests:
        if isinstance(request, _Malformed):
          await _refuse(context, request)
        yield request
    return each()

  async def first(request, context):
    if streaming_request:
      return checked(request, context)
    if isinstance(request, _Malformed):
      await _refuse(context, request)
    return request

  if inspect.isasyncgenfunction(behavior):
    async def stream(request, context):
      async with contextlib.aclosing(behavior(await first(request, context), context)) as items:
        async for item in items:     # closing this stream closes the inner one (its cleanup runs)
          yield item
    return stream

  async def call(request, context):
    return await behavior(await first(request, context), context)
  return call


class RejectMalformed(grpc.aio.ServerInterceptor):
  async def intercept_service(self, continuation, details):
    handler = await continuation(details)
    if handler is None or handler.request_deserializer is None:
      return handler
    kind = {(False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
            (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
            (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
            (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream)}
    make, behavior = kind[handler.request_streaming, handler.response_streaming]
    if not (inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior)):
      return handler                 # every service here is asynchronous; leave others alone
    return make(_wrap(behavior, handler.request_streaming),
                _checked_deserializer(handler.request_deserializer), handler.response_serializer)


__all__ = ["RejectMalformed"]
