"""TLS for runplane's gRPC channels and HTTP ports, from the same three settings everywhere.

Every service, the SDK and the CLI read the same variables (PEM files):

- ``RUNPLANE_TLS_CERT`` and ``RUNPLANE_TLS_KEY``: on a service, its certificate: with both set,
  every port it serves (gRPC and HTTP) speaks TLS. On a client, a certificate it presents when a
  server asks for one (mutual TLS).
- ``RUNPLANE_TLS_CA``: on a client, the CA its servers' certificates are checked against (TLS
  on, trusting that CA only). On a service, the CA its clients' certificates are checked against
  when ``RUNPLANE_TLS_REQUIRE_CLIENT_CERT=1`` makes its gRPC ports require one (mutual TLS).
  A service is also a client (the executor and realtime call the scheduler) and uses it so too.

With none set, everything is plaintext, as before. A client also speaks TLS (system roots)
when its URL says so: ``https://host:port`` or ``grpcs://host:port``.

This module is public (not ``runplane._tls``) because the services build their servers and
channels with it, and services use only the SDK's public modules.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from runplane._errors import ConfigurationError

TLS_SCHEMES = ("https://", "grpcs://")
PLAIN_SCHEMES = ("http://", "grpc://")


@dataclass(frozen=True)
class TlsSettings:
    """Paths of PEM files; an empty path is unset."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    # On a service: its gRPC ports refuse clients without a certificate signed by ``ca``.
    require_client_cert: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TlsSettings:
        env = os.environ if environ is None else environ
        settings = cls(
            cert=env.get("RUNPLANE_TLS_CERT", ""),
            key=env.get("RUNPLANE_TLS_KEY", ""),
            ca=env.get("RUNPLANE_TLS_CA", ""),
            require_client_cert=env.get("RUNPLANE_TLS_REQUIRE_CLIENT_CERT", "").lower()
            in ("1", "true", "yes"),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ConfigurationError for settings that cannot work together."""
        if bool(self.cert) != bool(self.key):
            raise ConfigurationError(
                "RUNPLANE_TLS_CERT and RUNPLANE_TLS_KEY go together: set both or neither"
            )
        if self.require_client_cert and not (self.ca and self.cert):
            raise ConfigurationError(
                "RUNPLANE_TLS_REQUIRE_CLIENT_CERT needs RUNPLANE_TLS_CA (to check client "
                "certificates) and RUNPLANE_TLS_CERT/RUNPLANE_TLS_KEY (to serve TLS at all)"
            )

    @property
    def serves_tls(self) -> bool:
        """Whether a service with these settings serves TLS."""
        return bool(self.cert and self.key)

    # -- servers -------------------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for a gRPC port (requires :attr:`serves_tls`)."""
        return grpc.ssl_server_credentials(
            [(_read(self.key), _read(self.cert))],
            root_certificates=_read(self.ca) if self.require_client_cert else None,
            require_client_auth=self.require_client_cert,
        )

    def server_ssl_context(self) -> ssl.SSLContext:
        """The context of an HTTP port (requires :attr:`serves_tls`). HTTP ports never ask for a
        client certificate: browsers and token URLs are their callers."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context

    # -- clients -------------------------------------------------------------------------------

    def client_ssl_context(self) -> ssl.SSLContext:
        """A context for HTTPS requests to runplane's HTTP ports."""
        context = ssl.create_default_context(cafile=self.ca or None)
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca) if self.ca else None,
            private_key=_read(self.key) if self.cert else None,
            certificate_chain=_read(self.cert) if self.cert else None,
        )


def split_target(url: str) -> tuple[str, bool | None]:
    """``host:port`` of a URL, and whether its scheme asks for TLS (None: it does not say)."""
    for scheme in TLS_SCHEMES:
        if url.startswith(scheme):
            return url.removeprefix(scheme).rstrip("/"), True
    for scheme in PLAIN_SCHEMES:
        if url.startswith(scheme):
            return url.removeprefix(scheme).rstrip("/"), False
    return url, None


def open_channel(
    url: str,
    tls: TlsSettings | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A gRPC channel to ``url`` (``host:port``, or with a scheme): TLS when ``tls.ca`` is set
    or the scheme is ``https``/``grpcs``, plaintext otherwise. ``tls`` defaults to the
    ``RUNPLANE_TLS_*`` environment."""
    tls = TlsSettings.from_env() if tls is None else tls
    target, by_scheme = split_target(url)
    secure = by_scheme if by_scheme is not None else bool(tls.ca)
    if not secure:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=list(options))


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigurationError(f"cannot read the TLS file {path!r}: {error}") from None


__all__ = ["TlsSettings", "open_channel", "split_target"]
