"""Code the runplane services share: configuration, ids, database, auth, errors, telemetry,
NATS subjects and the gRPC server factory."""
