"""WaitpointService: create, complete, read and list wait tokens."""

from __future__ import annotations

import re
from typing import Any

import orjson

from runplane.v1 import (
    run_pb2,
    waitpoint_service_pb2_grpc,
)
from runplane.v1 import waitpoint_service_pb2 as wspb
from runplane_common import auth
from runplane_common.auth import principal
from runplane_common.config import SchedulerSettings
from runplane_common.errors import InvalidArgument
from runplane_scheduler import validation
from runplane_scheduler.api import Context
from runplane_scheduler.engine import RunEngine
from runplane_scheduler.engine.waitpoints import token_status
from runplane_scheduler.keys import PublicTokens
from runplane_scheduler.store import now_ms, timestamp


class WaitpointServicer(waitpoint_service_pb2_grpc.WaitpointServiceServicer):
    """Wait tokens: create, complete, read."""

    def __init__(
        self,
        engine: RunEngine,
        settings: SchedulerSettings,
        http_url: str,
        tokens: PublicTokens,
    ) -> None:
        self.waits = engine.waits
        self.limits = settings.limits
        self.http_url = http_url
        self.tokens = tokens

    def _token_pb(self, m: Any) -> wspb.WaitToken:
        error = None
        if m["error"]:
            e = orjson.loads(m["error"])
            error = run_pb2.RunError(type=e.get("type", ""), message=e.get("message", ""))
        return wspb.WaitToken(
            id=m["id"],
            status=wspb.WaitpointStatus.Value(f"WAITPOINT_STATUS_{token_status(m)}"),
            url=f"{self.http_url}/api/v1/waitpoints/tokens/{m['id']}/complete?secret={m['secret']}",
            idempotency_key=m["idempotency_key"] or "",
            idempotency_key_expires_at=timestamp(m["idempotency_key_expires_at"]),
            tags=orjson.loads(m["tags"]),
            timeout_at=timestamp(m["due_at"]),
            created_at=timestamp(m["created_at"]),
            completed_at=timestamp(m["completed_at"]),
            output=m["output"] or "",
            error=error,
        )

    async def CreateToken(
        self, request: wspb.CreateTokenRequest, context: Context
    ) -> wspb.CreateTokenResponse:
        tags = list(validation.tag_list("tags", list(request.tags), self.limits))
        validation.text(
            "idempotency_key", request.idempotency_key, self.limits.idempotency_key_length
        )
        row, cached = await self.waits.create_token(
            principal().environment_id,
            timeout_ms=validation.duration_ms("timeout", request.timeout, minimum_ms=1)
            if request.HasField("timeout")
            else 0,
            idempotency_key=request.idempotency_key,
            idempotency_key_ttl_ms=validation.duration_ms(
                "idempotency_key_ttl", request.idempotency_key_ttl, minimum_ms=1000
            )
            if request.HasField("idempotency_key_ttl")
            else 0,
            tags=tags,
        )
        who = principal()
        access = await self.tokens.mint(
            who, [f"write:waitpoints:{row['id']}"], now_ms() + TOKEN_ACCESS_LIFETIME_MS
        )
        return wspb.CreateTokenResponse(
            token=self._token_pb(row), is_cached=cached, public_access_token=access
        )

    async def CompleteToken(
        self, request: wspb.CompleteTokenRequest, context: Context
    ) -> wspb.CompleteTokenResponse:
        token_id = _token_id(request.token_id)
        auth.authorize_complete_token(principal(), token_id)
        data = validation.json_text(
            "data",
            request.data,
            self.limits.payload_bytes,
            "payload",
            default="null",
            depth=self.limits.json_depth,
        )
        row = await self.waits.complete_token(token_id, data, env=principal().environment_id)
        return wspb.CompleteTokenResponse(token=self._token_pb(row))

    async def GetToken(
        self, request: wspb.GetTokenRequest, context: Context
    ) -> wspb.GetTokenResponse:
        row = await self.waits.get_token(principal().environment_id, _token_id(request.token_id))
        return wspb.GetTokenResponse(token=self._token_pb(row))

    async def ListTokens(
        self, request: wspb.ListTokensRequest, context: Context
    ) -> wspb.ListTokensResponse:
        validation.filter_sizes(request, ("tags", "statuses"), self.limits)
        size = validation.page_size(request.page_size, self.limits.page_size)
        statuses = []
        for i, v in enumerate(request.statuses):
            if v not in wspb.WaitpointStatus.values() or v == wspb.WAITPOINT_STATUS_UNSPECIFIED:
                raise InvalidArgument(f"statuses[{i}]", f"{v} is not a waitpoint status")
            statuses.append(wspb.WaitpointStatus.Name(v).removeprefix("WAITPOINT_STATUS_"))
        for i, tag in enumerate(request.tags):
            validation.text(f"tags[{i}]", tag, self.limits.tag_length)
        validation.text(
            "idempotency_key", request.idempotency_key, self.limits.idempotency_key_length
        )
        filters = validation.page_filters(request)
        after = validation.decode_page_token(request.page_token, TOKEN_ID, filters)
        rows = await self.waits.list_tokens(
            principal().environment_id,
            statuses=statuses,
            tags=list(request.tags),
            idempotency_key=request.idempotency_key,
            after=after,
            limit=size + 1,
        )
        more = len(rows) > size
        rows = rows[:size]
        return wspb.ListTokensResponse(
            tokens=[self._token_pb(r) for r in rows],
            next_page_token=validation.encode_page_token(rows[-1]["id"], filters) if more else "",
        )


TOKEN_ID = re.compile(r"^waitpoint_[0-9a-z]{1,36}\Z")
TOKEN_ACCESS_LIFETIME_MS = 24 * 3600 * 1000


def _token_id(value: str, field: str = "token_id") -> str:
    if not TOKEN_ID.match(value):
        raise InvalidArgument(field, f"{value[:80]!r} is not a token id (waitpoint_...)")
    return value
