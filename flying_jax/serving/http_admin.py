"""The Admin service over HTTP: the gRPC `Admin` calls and the server's reads under `/admin`.

Same token, same refusals as over gRPC (servicers.Admin): without `--admin-token` every call is
refused (403); a call without `Authorization: Bearer TOKEN` is 401, a wrong token 403. A refused
change (an unknown partition, strategy or policy: 400; a request in flight too long for the
target: 409) changes nothing. Every change answers with the stats after it, as the gRPC reply
does. Routes: `GET /admin/stats`, `GET /admin/info`, `POST /admin/policy {"policy"}`, `POST
/admin/pin {"partition", "strategy"}`, `POST /admin/release`, `POST /admin/drain`.
"""

from __future__ import annotations

import asyncio
import hmac

from fastapi import APIRouter, Depends, Request
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict

from flying_jax.serving.openai_errors import ApiError


def bearer_ok(request: Request, secret: str) -> bool:
  """Whether the request carries `Authorization: Bearer <secret>` (compared in constant time)."""
  given = request.headers.get("authorization", "")
  return hmac.compare_digest(given.encode(), f"Bearer {secret}".encode())


class PolicyBody(BaseModel):
  model_config = ConfigDict(extra="forbid")
  policy: str | None = None                 # None or "": no policy


class PinBody(BaseModel):
  model_config = ConfigDict(extra="forbid")
  partition: str | int
  strategy: str = "drain"


def _dict(message) -> dict:
  return MessageToDict(message, preserving_proto_field_name=True,
                       always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)


def admin_router(server) -> APIRouter:
  """The `/admin` routes of `server`."""

  async def authorize(request: Request):
    token = server.config.admin_token
    if not token:
      raise ApiError(403, "the admin API is disabled: start the server with --admin-token")
    if "authorization" not in request.headers:
      raise ApiError(401, "admin calls need the header 'Authorization: Bearer TOKEN'")
    if not bearer_ok(request, token):
      raise ApiError(403, "wrong admin token")

  async def stats() -> dict:
    return _dict(await server.stats())

  async def change(fn, message: str) -> dict:
    try:
      await asyncio.wrap_future(server.loop.call(fn))
    except ValueError as e:
      raise ApiError(400, str(e)) from None
    except RuntimeError as e:
      raise ApiError(409, str(e)) from None
    return {"message": message, "stats": await stats()}

  async def info() -> dict:
    return _dict(server.info())

  async def set_policy(body: PolicyBody) -> dict:
    policy = body.policy or None
    return await change(lambda e: e.set_policy(policy), f"policy set to {policy or 'none'}")

  async def pin(body: PinBody) -> dict:
    target = body.partition
    target = int(target) if isinstance(target, str) and target.isdigit() else target
    return await change(lambda e: e.pin(target, body.strategy),
                        f"partition {body.partition} pinned ({body.strategy})")

  async def release() -> dict:
    policy = server.config.policy
    return await change(lambda e: e.set_policy(policy),
                        f"partition released; policy {policy or 'none'}")

  async def drain() -> dict:
    await server.begin_drain()
    return {"message": "draining: no new requests are admitted", "stats": await stats()}

  router = APIRouter(prefix="/admin", dependencies=[Depends(authorize)])
  router.add_api_route("/stats", stats, methods=["GET"])
  router.add_api_route("/info", info, methods=["GET"])
  router.add_api_route("/policy", set_policy, methods=["POST"])
  router.add_api_route("/pin", pin, methods=["POST"])
  router.add_api_route("/release", release, methods=["POST"])
  router.add_api_route("/drain", drain, methods=["POST"])
  return router


__all__ = ["admin_router", "bearer_ok"]
