"""AuthService: public access tokens minted for the caller's environment."""

from __future__ import annotations

import time

from runplane.v1 import auth_service_pb2 as apb
from runplane.v1 import auth_service_pb2_grpc
from runplane_common import auth
from runplane_common.errors import InvalidArgument
from runplane_scheduler import keys, validation
from runplane_scheduler.api import Context


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    def __init__(self, tokens: keys.PublicTokens) -> None:
        self.tokens = tokens

    async def CreatePublicToken(
        self, request: apb.CreatePublicTokenRequest, context: Context
    ) -> apb.CreatePublicTokenResponse:
        scopes = auth.validate_scopes(list(request.scopes))
        now = int(time.time() * 1000)
        if request.HasField("expires_in") and request.HasField("expires_at"):
            raise InvalidArgument("expires_at", "give expires_in or expires_at, not both")
        if request.HasField("expires_at"):
            expires_at = validation.timestamp_ms("expires_at", request.expires_at)
            field = "expires_at"
        elif request.HasField("expires_in"):
            expires_at = now + validation.duration_ms("expires_in", request.expires_in)
            field = "expires_in"
        else:
            expires_at, field = now + auth.DEFAULT_TOKEN_LIFETIME_MS, "expires_in"
        if expires_at <= now:
            raise InvalidArgument(field, "the token would be expired already")
        if expires_at - now > auth.MAX_TOKEN_LIFETIME_MS:
            raise InvalidArgument(field, "a public token lives at most 30 days")
        token = await self.tokens.mint(auth.principal(), scopes, expires_at, request.single_use)
        response = apb.CreatePublicTokenResponse(token=token)
        response.expires_at.FromMilliseconds(expires_at)
        return response
