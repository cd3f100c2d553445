"""The realtime service: run subscriptions fed by JetStream, reconciled against the scheduler."""
