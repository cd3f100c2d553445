"""The base of the client's namespaces (``client.runs``, ``client.queues``, ...)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runplane._client import Client


class Namespace:
    """Bound to a client, or (module-level) to the default client from the environment."""

    def __init__(self, client: Client | None) -> None:
        self._bound = client

    @property
    def _client(self) -> Client:
        from runplane._client import default_client

        return self._bound or default_client()
