"""A small client of OpenAI-compatible servers for the benchmark: streamed completions timed
chunk by chunk, and the JSON reads and admin calls around a run.

The stream is plain HTTP/1.1 over asyncio streams (one connection per request, as vLLM's
benchmark opens one aiohttp session per request), so the load generator needs no HTTP library
and every server-sent event is timed when its bytes arrive, not when a library hands them over.
The JSON calls (`get_json`, `post_json`) are synchronous: they run between measured runs.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request


class HttpError(Exception):
  """A non-2xx answer: its status and the error message of its body."""

  def __init__(self, status: int, message: str):
    super().__init__(f"HTTP {status}: {message}")
    self.status, self.message = status, message


def _host_port(target: str) -> tuple[str, int]:
  target = target.split("://", 1)[-1].rstrip("/")
  host, _, port = target.rpartition(":")
  return host.strip("[]") or "127.0.0.1", int(port)


def _message(status: int, raw: bytes) -> str:
  try:
    body = json.loads(raw)
    return body["error"]["message"] if isinstance(body.get("error"), dict) else str(body)
  except (ValueError, KeyError, TypeError, AttributeError):
    return raw.decode("utf-8", "replace")[:500] or f"status {status}"


async def _head(reader) -> tuple[int, dict[str, str]]:
  status_line = await reader.readline()
  parts = status_line.decode("latin-1").split(" ", 2)
  if len(parts) < 2 or not parts[1].isdigit():
    raise HttpError(0, f"not an HTTP answer: {status_line[:80]!r}")
  headers = {}
  while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
    name, _, value = line.decode("latin-1").partition(":")
    headers[name.strip().lower()] = value.strip()
  return int(parts[1]), headers


async def _body(reader, headers: dict[str, str]):
  """The body's bytes as they arrive (chunked, sized or until the connection closes)."""
  if headers.get("transfer-encoding", "").lower() == "chunked":
    while True:
      size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
      if size == 0:
        return
      yield await reader.readexactly(size)
      await reader.readline()
  elif "content-length" in headers:
    yield await reader.readexactly(int(headers["content-length"]))
  else:
    while chunk := await reader.read(65536):
      yield chunk


async def stream_events(target: str, path: str, body: dict, api_key: str | None = None):
  """POST `body` as JSON and yield each server-sent event's JSON until `data: [DONE]`; raises
  HttpError for an error status, or for an error event inside the stream."""
  host, port = _host_port(target)
  reader, writer = await asyncio.open_connection(host, port)
  try:
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    writer.write((f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: "
                  f"application/json\r\nAccept: text/event-stream\r\nContent-Length: "
                  f"{len(payload)}\r\nConnection: close\r\n{auth}\r\n").encode() + payload)
    await writer.drain()
    status, headers = await _head(reader)
    if status != 200:
      raw = b"".join([c async for c in _body(reader, headers)])
      raise HttpError(status, _message(status, raw))
    buffer = b""
    async for chunk in _body(reader, headers):
      buffer += chunk.replace(b"\r\n", b"\n")
      while b"\n\n" in buffer:
        event, buffer = buffer.split(b"\n\n", 1)
        data = b"".join(l[5:].strip() for l in event.split(b"\n") if l.startswith(b"data:"))
        if not data:
          continue
        if data == b"[DONE]":
          return
        obj = json.loads(data)
        if isinstance(obj.get("error"), dict):
          raise HttpError(500, obj["error"].get("message", "error"))
        yield obj
  finally:
    writer.close()


def _call(target: str, path: str, token: str | None, data: dict | None, timeout: float) -> dict:
  host, port = _host_port(target)
  body = None if data is None else json.dumps(data).encode()
  req = urllib.request.Request(f"http://{host}:{port}{path}", data=body,
                               method="GET" if data is None else "POST")
  req.add_header("Content-Type", "application/json")
  if token:
    req.add_header("Authorization", f"Bearer {token}")
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return json.loads(r.read() or b"{}")
  except urllib.error.HTTPError as e:
    raise HttpError(e.code, _message(e.code, e.read())) from None


def get_json(target: str, path: str, token: str | None = None, timeout: float = 60.0) -> dict:
  return _call(target, path, token, None, timeout)


def post_json(target: str, path: str, data: dict, token: str | None = None,
              timeout: float = 60.0) -> dict:
  return _call(target, path, token, data, timeout)


__all__ = ["HttpError", "get_json", "post_json", "stream_events"]
