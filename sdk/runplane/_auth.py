"""``runplane.auth``: public access tokens for browsers and other untrusted clients.

Tokens are minted by the scheduler (``AuthService.CreatePublicToken``): secret keys are stored
hashed there, so the SDK has nothing to sign with, and the installation's signing key never
leaves the servers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from runplane._namespace import Namespace
from runplane.v1 import auth_service_pb2, auth_service_pb2_grpc

Expiration = str | int | float | timedelta | datetime

_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_SPAN_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def flatten_scopes(scopes: Mapping[str, Mapping[str, Iterable[str] | str]]) -> list[str]:
    """``{"read": {"runs": ["run_1"], "tags": ["user_1"]}}`` → ``["read:runs:run_1",
    "read:tags:user_1"]``."""
    flat: list[str] = []
    for action, resources in scopes.items():
        for kind, ids in resources.items():
            for one in [ids] if isinstance(ids, str) else ids:
                flat.append(f"{action}:{kind}:{one}")
    return flat


def _expiry(request: auth_service_pb2.CreatePublicTokenRequest, when: Expiration) -> None:
    """A span ("15m", "2h", "1d"), a timedelta, a datetime, or Unix seconds."""
    if isinstance(when, str):
        match = _SPAN.match(when)
        if match is None:
            raise ValueError(f"expiration_time {when!r}: use a span like '30s', '15m', '2h', '1d'")
        seconds = float(match.group(1)) * _SPAN_SECONDS[match.group(2)]
        request.expires_in.FromTimedelta(timedelta(seconds=seconds))
    elif isinstance(when, timedelta):
        request.expires_in.FromTimedelta(when)
    elif isinstance(when, datetime):
        request.expires_at.FromDatetime(when.astimezone(UTC))
    else:
        request.expires_at.FromDatetime(datetime.fromtimestamp(when, tz=UTC))


class AuthAPI(Namespace):
    """Mint public access tokens: scoped (``read:runs:<id>``, ``read:tags:<tag>``,
    ``read:batch:<id>``, ``trigger:tasks:<id>``) and expiring (15 minutes by default)."""

    async def _create(
        self, scopes: list[str], expiration_time: Expiration, single_use: bool
    ) -> str:
        request = auth_service_pb2.CreatePublicTokenRequest(scopes=scopes, single_use=single_use)
        _expiry(request, expiration_time)
        transport = self._transport
        stub = auth_service_pb2_grpc.AuthServiceStub(transport.channel())
        response = await transport.call(stub.CreatePublicToken, request)
        token: str = response.token
        return token

    async def create_public_token(
        self,
        *,
        scopes: Mapping[str, Mapping[str, Iterable[str] | str]],
        expiration_time: Expiration = "15m",
    ) -> str:
        """A token that may read what ``scopes`` names, e.g.
        ``{"read": {"runs": ["run_1"], "tags": ["user_1"], "batch": ["batch_1"]}}``."""
        return await self._create(flatten_scopes(scopes), expiration_time, single_use=False)

    def create_public_token_sync(self, **kwargs: Any) -> str:
        return self._transport.run_sync(self.create_public_token(**kwargs))

    async def create_trigger_public_token(
        self,
        task_id: str | Iterable[str],
        *,
        multiple_use: bool = False,
        expiration_time: Expiration = "15m",
    ) -> str:
        """A token that may trigger ``task_id`` (once, unless ``multiple_use``)."""
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        scopes = [f"trigger:tasks:{one}" for one in ids]
        return await self._create(scopes, expiration_time, single_use=not multiple_use)

    def create_trigger_public_token_sync(self, task_id: str | Iterable[str], **kwargs: Any) -> str:
        return self._transport.run_sync(self.create_trigger_public_token(task_id, **kwargs))

    async def create_batch_public_token(
        self, batch_id: str, *, expiration_time: Expiration = "15m"
    ) -> str:
        """A token that may read the runs of one batch (``read:batch:<id>``): what a batch
        trigger hands back."""
        return await self._create([f"read:batch:{batch_id}"], expiration_time, single_use=False)

    def create_batch_public_token_sync(self, batch_id: str, **kwargs: Any) -> str:
        return self._transport.run_sync(self.create_batch_public_token(batch_id, **kwargs))
