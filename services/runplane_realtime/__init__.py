"""The realtime service: run subscriptions fed by JetStream, reconciled against the scheduler.

    server.py         the service: the gRPC servicer, and the wiring of everything below
    http.py           the HTTP endpoints (SSE, trigger by URL)
    core.py           what both share: authorise with the scheduler, then open a feed
    subscriptions.py  a run's, a tag's or a batch's versions, complete and in order
    streams.py        run streams (chunks on RUN_STREAMS)
    feed.py           a subscriber's bounded buffer, cut off when it falls behind
    events.py         the NATS link and ordered JetStream readers
    scheduler.py      the scheduler client (each call carries the caller's credentials)

Each module imports only those listed below it; no database, no scheduler package.
"""
