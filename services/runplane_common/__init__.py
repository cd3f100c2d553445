"""Code the runplane services share: configuration, ids, database, auth, errors, telemetry,
NATS subjects and the gRPC server factory. It imports no service package; ``errors`` imports
no transport (grpc, protobuf), and only ``db`` touches a database."""
