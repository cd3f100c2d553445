"""The scheduler's gRPC and HTTP surfaces: one module per proto service (``runs``, ``queues``,
``worker``, ``meta``, ``waitpoints``, ``auth``) plus the token-completion HTTP endpoint
(``token_http``). Servicers check who calls, turn protobuf requests into domain objects
(``runplane_scheduler.validation``), call the engine, and turn its answers back into protobuf.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
