"""What a reflection client (``buf curl --list-methods``, grpcurl) sees of a gRPC server."""

from __future__ import annotations

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def list_services(address: str) -> dict[str, list[str]]:
    """Service name → method names, as a reflection client sees them."""
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = DescriptorPool(database)
        return {
            name: [m.name for m in pool.FindServiceByName(name).methods]
            for name in database.get_services()
        }
