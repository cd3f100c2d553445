"""MetaService: what a client learns about the server it calls."""

from __future__ import annotations

from runplane import __version__
from runplane.v1 import (
    meta_service_pb2 as mpb,
)
from runplane.v1 import (
    meta_service_pb2_grpc,
)
from runplane_common.auth import principal
from runplane_common.config import SchedulerSettings
from runplane_scheduler.api import Context


class MetaServicer(meta_service_pb2_grpc.MetaServiceServicer):
    def __init__(self, settings: SchedulerSettings, http_url: str = "") -> None:
        self.settings = settings
        self.http_url = http_url

    async def GetServerInfo(
        self, request: mpb.GetServerInfoRequest, context: Context
    ) -> mpb.GetServerInfoResponse:
        return mpb.GetServerInfoResponse(
            realtime_url=self.settings.realtime_url,
            version=__version__,
            environment=principal().environment_slug,
            http_url=self.http_url,
            realtime_http_url=self.settings.realtime_http_url,
            environment_id=principal().environment_id,
        )
