"""Wait until a gRPC server answers grpc.health.v1.Health/Check = SERVING (product venv).

usage: python -m bench.clients.grpc_health 127.0.0.1:PORT TIMEOUT_S ; exit 0 when serving.
"""

import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    target, timeout = sys.argv[1], float(sys.argv[2])
    deadline = time.monotonic() + timeout
    last = ""
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return 0
                last = f"status {r.status}"
            except grpc.RpcError as e:
                last = f"{e.code()}"
            time.sleep(0.1)
    print(f"not serving after {timeout}s: {last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
