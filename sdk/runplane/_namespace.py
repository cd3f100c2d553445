"""The base of the client's namespaces (``client.runs``, ``client.queues``, ...)."""

from __future__ import annotations

from typing import Protocol

from runplane._transport import Transport, default_transport


class Connected(Protocol):
    """What a namespace is bound to: a :class:`runplane.Client`."""

    @property
    def transport(self) -> Transport: ...


def transport_of(client: Connected | None) -> Transport:
    """``client``'s transport; the default client's for None."""
    return client.transport if client is not None else default_transport()


class Namespace:
    """Bound to a client, or (module-level) to the default client from the environment."""

    def __init__(self, client: Connected | None) -> None:
        self._bound = client

    @property
    def _transport(self) -> Transport:
        return transport_of(self._bound)
