"""Errors of the HTTP API in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

OpenAI's clients read the HTTP status to pick the exception they raise (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, 503 ...) and show `message`; so every
refusal, including FastAPI's own (a body that fails validation, an unknown route), is answered
in this shape with the status that names its cause.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("flying_jax")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "service_unavailable"}


class ApiError(Exception):
  """A request the server answers with an error: HTTP `status` and OpenAI's error fields."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                      "param": self.param, "code": self.code}}

  def response(self) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
    return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
  return ApiError(400, message, param)


def _where(loc) -> str:
  """A pydantic error location as the field path a client wrote (`messages.0.content`)."""
  return ".".join(str(p) for p in loc if p != "body")


def validation_error(errors) -> ApiError:
  """Pydantic's errors as one 400 naming each field: unknown fields as OpenAI words them."""
  parts, first = [], None
  for e in errors:
    where = _where(e.get("loc", ()))
    first = first or where or None
    if e.get("type") == "extra_forbidden":
      parts.append(f"Unrecognized request argument supplied: {where}")
    elif e.get("type") == "json_invalid":
      parts.append(f"the request body is not valid JSON ({e.get('ctx', {}).get('error', '')})")
    elif not where and e.get("type") in ("missing", "model_attributes_type", "dict_type"):
      parts.append("the request body must be a JSON object (Content-Type: application/json)")
    else:
      parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
  return bad_request("; ".join(parts) or "invalid request", first)


def install(app: FastAPI):
  """Answer every error the app raises in OpenAI's shape."""

  @app.exception_handler(ApiError)
  async def _api(request: Request, exc: ApiError):
    return exc.response()

  @app.exception_handler(RequestValidationError)
  async def _invalid(request: Request, exc: RequestValidationError):
    return validation_error(exc.errors()).response()

  @app.exception_handler(HTTPException)
  async def _http(request: Request, exc: HTTPException):
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
      message = f"no route {request.method} {request.url.path}"
    return ApiError(exc.status_code, message).response()

  @app.exception_handler(Exception)
  async def _bug(request: Request, exc: Exception):
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()


__all__ = ["ApiError", "bad_request", "install", "validation_error"]
