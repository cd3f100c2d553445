"""Service settings: frozen dataclasses, read from ``RUNPLANE_*`` (and ``OTEL_*``) environment
variables by their ``from_env`` here, which each service's ``main`` calls. Nothing else in the
services reads the environment; tests build settings directly."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from runplane.telemetry import TraceExport
from runplane.tls import TlsSettings

DEFAULT_API_URL = "localhost:7070"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_REALTIME_HTTP_LISTEN = "127.0.0.1:7072"


def default_database_url() -> str:
    return f"sqlite+aiosqlite:///{Path('.runplane').absolute() / 'runplane.db'}"


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


NATS_SCHEMES = ("nats", "tls", "ws", "wss")
# JetStream keeps at most 5 copies of a stream (one per server of a cluster).
MAX_NATS_REPLICAS = 5


def parse_nats_servers(value: str) -> tuple[str, ...]:
    """``RUNPLANE_NATS_URL``: one NATS server URL, or the servers of a cluster comma-separated
    (``nats://n1:4222,nats://n2:4222``); ``host:port`` means ``nats://host:port``. A bad value
    is a ``ValueError`` naming the variable (without any password the URLs carry)."""
    servers = tuple(part.strip() for part in value.split(","))
    for server in servers:
        url = urlsplit(server if "://" in server else f"nats://{server}")
        shown = url._replace(netloc=url.netloc.rpartition("@")[2]).geturl() if server else ""
        try:
            valid = url.scheme in NATS_SCHEMES and bool(url.hostname) and url.port != 0
        except ValueError:  # a port that is not a number, or out of range
            valid = False
        if not valid:
            raise ValueError(
                "RUNPLANE_NATS_URL must be a NATS server URL (nats://host:port) or several, "
                f"comma-separated; {shown!r} is not one"
            )
    return servers


def check_nats_replicas(replicas: int) -> None:
    if not 1 <= replicas <= MAX_NATS_REPLICAS:
        raise ValueError(
            f"RUNPLANE_NATS_REPLICAS must be 1 to {MAX_NATS_REPLICAS} (at most the NATS "
            f"cluster's size), not {replicas}"
        )


def _nats_replicas() -> int:
    raw = os.environ.get("RUNPLANE_NATS_REPLICAS", "").strip()
    if not raw:
        return 1
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"RUNPLANE_NATS_REPLICAS must be a whole number from 1 to {MAX_NATS_REPLICAS}, "
            f"not {raw!r}"
        ) from None


@dataclass(frozen=True)
class Limits:
    """API limits (SPEC §3); each is configurable through ``RUNPLANE_LIMIT_*``."""

    payload_bytes: int = 3 * 1024 * 1024
    output_bytes: int = 10 * 1024 * 1024
    metadata_bytes: int = 256 * 1024
    tags: int = 10
    tag_length: int = 128
    idempotency_key_length: int = 2048
    max_attempts: int = 250
    page_size: int = 100
    batch_items: int = 1000
    # Nesting of JSON values (payloads, metadata, outputs, token data): deeper ones are refused
    # at the API, since every reader (SSE, other languages' decoders) must be able to decode them.
    json_depth: int = 100
    # Values one ListRuns filter may name (tags, task ids, statuses).
    filter_values: int = 100

    @classmethod
    def from_env(cls) -> Limits:
        d = cls()
        return cls(
            payload_bytes=_int("RUNPLANE_LIMIT_PAYLOAD_BYTES", d.payload_bytes),
            output_bytes=_int("RUNPLANE_LIMIT_OUTPUT_BYTES", d.output_bytes),
            metadata_bytes=_int("RUNPLANE_LIMIT_METADATA_BYTES", d.metadata_bytes),
            tags=_int("RUNPLANE_LIMIT_TAGS", d.tags),
            tag_length=_int("RUNPLANE_LIMIT_TAG_LENGTH", d.tag_length),
            idempotency_key_length=_int(
                "RUNPLANE_LIMIT_IDEMPOTENCY_KEY_LENGTH", d.idempotency_key_length
            ),
            batch_items=_int("RUNPLANE_LIMIT_BATCH_ITEMS", d.batch_items),
            max_attempts=_int("RUNPLANE_LIMIT_MAX_ATTEMPTS", d.max_attempts),
            page_size=_int("RUNPLANE_LIMIT_PAGE_SIZE", d.page_size),
            json_depth=_int("RUNPLANE_LIMIT_JSON_DEPTH", d.json_depth),
            filter_values=_int("RUNPLANE_LIMIT_FILTER_VALUES", d.filter_values),
        )


@dataclass(frozen=True)
class TelemetrySettings:
    """Trace export (see :mod:`runplane_common.telemetry`), from the standard ``OTEL_*``
    variables (:class:`runplane.telemetry.TraceExport` says what each means; a bad value is a
    ``ValueError`` naming its variable). The OTLP exporter itself still reads its own
    ``OTEL_EXPORTER_OTLP_*`` options (insecure, headers, ...), as the OpenTelemetry SDK documents
    them."""

    service_name: str
    # OTEL_TRACES_EXPORTER: "otlp", "console", "none", or "" (otlp if an endpoint is set).
    traces_exporter: str = ""
    # OTEL_EXPORTER_OTLP_ENDPOINT: the collector; set, it turns export on.
    otlp_endpoint: str = ""
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: the full traces URL; wins over otlp_endpoint.
    otlp_traces_endpoint: str = ""
    # OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL: "grpc" (the default)
    # or "http/protobuf".
    otlp_protocol: str = ""
    # OTEL_RESOURCE_ATTRIBUTES: "key=value,..." added to every span's resource.
    resource_attributes: str = ""

    def __post_init__(self) -> None:
        self.export()  # refuses bad values at once, naming the variable

    def export(self) -> TraceExport:
        return TraceExport(
            self.service_name,
            self.traces_exporter,
            self.otlp_endpoint,
            self.otlp_traces_endpoint,
            self.otlp_protocol,
            self.resource_attributes,
        )

    @classmethod
    def from_env(cls, service_name: str) -> TelemetrySettings:
        """``service_name`` unless OTEL_SERVICE_NAME (or ``service.name`` in
        OTEL_RESOURCE_ATTRIBUTES) names the service."""
        e = TraceExport.from_environ(os.environ, service_name)
        return cls(
            service_name=e.service_name,
            traces_exporter=e.traces_exporter,
            otlp_endpoint=e.otlp_endpoint,
            otlp_traces_endpoint=e.otlp_traces_endpoint,
            otlp_protocol=e.otlp_protocol,
            resource_attributes=e.resource_attributes,
        )


def default_replica_id() -> str:
    """A scheduler replica's default name: its host and process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class SchedulerSettings:
    database_url: str = field(default_factory=default_database_url)
    # RUNPLANE_NATS_URL as given; nats_servers is it parsed (one URL, or a cluster's).
    nats_url: str = DEFAULT_NATS_URL
    # RUNPLANE_NATS_REPLICAS: the copies JetStream keeps of every stream runplane makes.
    nats_replicas: int = 1
    listen: str = "127.0.0.1:7070"
    realtime_url: str = ""
    # An executor whose stream is silent this long loses its attempts.
    lease_timeout: float = 15.0
    heartbeat_interval: float = 2.0
    # An assignment not acknowledged this long goes back to the queue.
    ack_timeout: float = 10.0
    environment_concurrency_limit: int = 100
    limits: Limits = field(default_factory=Limits)
    # The schedule clock, for tests: schedule time = epoch + (real time - epoch) * speed (ms).
    # At speed 1 (the default) it is the real clock; at 60 a minutely cron ticks every second.
    schedule_clock_speed: float = 1.0
    schedule_clock_epoch_ms: int = 0
    # Signs public access tokens; empty: a key generated once and kept in the database.
    signing_key: str = ""
    # Announced to clients: the realtime service's HTTP base URL (SSE, trigger by URL).
    realtime_http_url: str = ""
    # TLS on the gRPC port and the token HTTP port (RUNPLANE_TLS_*; see runplane.tls).
    tls: TlsSettings = field(default_factory=TlsSettings)
    # The HTTP endpoint that completes wait tokens by URL; empty: the gRPC host, a free port.
    http_listen: str = ""
    # Its URL as announced in tokens; empty: built from the address it listens on.
    http_url: str = ""
    # "auto": a worker version registering for the first time becomes current at once (dev,
    # and deploys that are "start the new executors"); "manual": only `runplane deploy`
    # (`versions promote`) makes a version current.
    version_promotion: str = "auto"
    # Replicas (PostgreSQL): this one's name in the lease, the address the others forward
    # calls to (empty: the listen host and the bound port), and the lease's length in seconds.
    replica_id: str = field(default_factory=default_replica_id)
    advertise: str = ""
    replica_lease: float = 5.0
    nats_servers: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nats_servers", parse_nats_servers(self.nats_url))
        if not 1.0 <= self.replica_lease <= 300.0:
            raise ValueError(
                f"RUNPLANE_REPLICA_LEASE_SECONDS must be 1-300 seconds, not {self.replica_lease}"
            )
        check_nats_replicas(self.nats_replicas)
        if self.version_promotion not in ("auto", "manual"):
            raise ValueError(
                "RUNPLANE_VERSION_PROMOTION must be 'auto' or 'manual', "
                f"not {self.version_promotion!r}"
            )

    @classmethod
    def from_env(cls) -> SchedulerSettings:
        d = cls()
        return cls(
            database_url=os.environ.get("RUNPLANE_DATABASE_URL") or d.database_url,
            nats_url=os.environ.get("RUNPLANE_NATS_URL") or d.nats_url,
            nats_replicas=_nats_replicas(),
            listen=os.environ.get("RUNPLANE_SCHEDULER_LISTEN") or d.listen,
            realtime_url=os.environ.get("RUNPLANE_REALTIME_URL", ""),
            lease_timeout=_float("RUNPLANE_LEASE_TIMEOUT", d.lease_timeout),
            heartbeat_interval=_float("RUNPLANE_HEARTBEAT_INTERVAL", d.heartbeat_interval),
            ack_timeout=_float("RUNPLANE_ACK_TIMEOUT", d.ack_timeout),
            environment_concurrency_limit=_int(
                "RUNPLANE_ENV_CONCURRENCY_LIMIT", d.environment_concurrency_limit
            ),
            limits=Limits.from_env(),
            schedule_clock_speed=_float("RUNPLANE_SCHEDULE_CLOCK_SPEED", d.schedule_clock_speed),
            schedule_clock_epoch_ms=_int(
                "RUNPLANE_SCHEDULE_CLOCK_EPOCH_MS", d.schedule_clock_epoch_ms
            ),
            signing_key=os.environ.get("RUNPLANE_SIGNING_KEY", ""),
            realtime_http_url=os.environ.get("RUNPLANE_REALTIME_HTTP_URL", ""),
            tls=TlsSettings.from_env(os.environ),
            http_listen=os.environ.get("RUNPLANE_SCHEDULER_HTTP_LISTEN", ""),
            http_url=os.environ.get("RUNPLANE_SCHEDULER_HTTP_URL", ""),
            version_promotion=os.environ.get("RUNPLANE_VERSION_PROMOTION") or d.version_promotion,
            replica_id=os.environ.get("RUNPLANE_REPLICA_ID") or d.replica_id,
            advertise=os.environ.get("RUNPLANE_ADVERTISE", ""),
            replica_lease=_float("RUNPLANE_REPLICA_LEASE_SECONDS", d.replica_lease),
        )


@dataclass(frozen=True)
class RealtimeSettings:
    # RUNPLANE_NATS_URL and RUNPLANE_NATS_REPLICAS, as for the scheduler.
    nats_url: str = DEFAULT_NATS_URL
    nats_replicas: int = 1
    api_url: str = DEFAULT_API_URL
    listen: str = "127.0.0.1:7071"
    # With no event for this long, a subscription checks the scheduler's snapshot.
    reconcile_interval: float = 5.0
    # The HTTP endpoints for browsers (SSE, trigger by URL); empty: none. From the environment
    # (RUNPLANE_REALTIME_HTTP_LISTEN) it defaults to 127.0.0.1:7072.
    http_listen: str = ""
    # Origins allowed to call the HTTP endpoints from a browser (CORS), comma-separated.
    cors_origins: str = "*"
    # Run streams: largest chunk, largest stream (bytes), and how long chunks are kept (seconds).
    stream_chunk_bytes: int = 1024 * 1024
    stream_max_bytes: int = 100 * 1024 * 1024
    stream_retention: float = 28 * 24 * 3600.0
    # TLS on the gRPC and HTTP ports, and to the scheduler (RUNPLANE_TLS_*; see runplane.tls).
    tls: TlsSettings = field(default_factory=TlsSettings)
    # Bytes of changes (or chunks) a subscriber may leave unread before it is cut off with a
    # resumable RESOURCE_EXHAUSTED (SSE: an error event), so a client that stops reading costs
    # at most this much.
    subscriber_buffer: int = 4 * 1024 * 1024
    # The API limits (RUNPLANE_LIMIT_*): a trigger by URL carries a payload up to payload_bytes.
    limits: Limits = field(default_factory=Limits)
    nats_servers: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nats_servers", parse_nats_servers(self.nats_url))
        check_nats_replicas(self.nats_replicas)

    @classmethod
    def from_env(cls) -> RealtimeSettings:
        d = cls()
        return cls(
            nats_url=os.environ.get("RUNPLANE_NATS_URL") or d.nats_url,
            nats_replicas=_nats_replicas(),
            api_url=os.environ.get("RUNPLANE_API_URL") or d.api_url,
            listen=os.environ.get("RUNPLANE_REALTIME_LISTEN") or d.listen,
            reconcile_interval=_float("RUNPLANE_RECONCILE_INTERVAL", d.reconcile_interval),
            http_listen=os.environ.get(
                "RUNPLANE_REALTIME_HTTP_LISTEN", DEFAULT_REALTIME_HTTP_LISTEN
            ),
            cors_origins=os.environ.get("RUNPLANE_CORS_ORIGINS") or d.cors_origins,
            stream_chunk_bytes=_int("RUNPLANE_STREAM_CHUNK_BYTES", d.stream_chunk_bytes),
            stream_max_bytes=_int("RUNPLANE_STREAM_MAX_BYTES", d.stream_max_bytes),
            stream_retention=_float("RUNPLANE_STREAM_RETENTION", d.stream_retention),
            tls=TlsSettings.from_env(os.environ),
            subscriber_buffer=_int("RUNPLANE_REALTIME_SUBSCRIBER_BUFFER", d.subscriber_buffer),
            limits=Limits.from_env(),
        )


@dataclass(frozen=True)
class ExecutorSettings:
    """An executor's settings: the task modules it runs, and ``RUNPLANE_*`` for the rest."""

    modules: list[str]
    api_url: str = DEFAULT_API_URL
    # The executor's credential: a worker key (RUNPLANE_WORKER_KEY), or a secret key made with
    # the execute right. Task code's own SDK calls use RUNPLANE_SECRET_KEY from the environment.
    secret_key: str = ""
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    capacity: int = 100
    listen: str = "127.0.0.1:0"
    cancel_grace: float = 3.0
    # Waiting attempts kept suspended in memory (0: no cap), and how long a wait of unknown end
    # (a token, child runs) stays before it is evicted; a duration wait expected to last longer
    # than that is evicted once settled (0: neither). Evicted runs resume by journal replay,
    # which runs the code before the wait again and costs a scheduler round trip per journaled
    # wait: so the cap bounds memory, and only waits past a minute are evicted without need.
    max_resident_waits: int = 1000
    evict_waits_after: float = 60.0
    # TLS to the scheduler and on the status port (RUNPLANE_TLS_*; see runplane.tls). With the
    # scheduler requiring client certificates, RUNPLANE_TLS_CERT is the one presented.
    tls: TlsSettings = field(default_factory=TlsSettings)
    # Outputs larger than this (RUNPLANE_LIMIT_OUTPUT_BYTES, the scheduler's limit too) fail the
    # attempt in its task process, with a clear error.
    output_limit: int = Limits.output_bytes
    # The worker version this executor registers (RUNPLANE_VERSION, --version); empty: a
    # content hash of its task definitions and its task modules' source.
    version: str = ""
    # The HTTP port of /metrics, /healthz and /readyz (RUNPLANE_EXECUTOR_HTTP_LISTEN,
    # host:port); empty: a free port on 127.0.0.1, which the executor logs.
    http_listen: str = ""

    @classmethod
    def from_env(
        cls,
        modules: list[str],
        *,
        processes: int | None = None,
        capacity: int | None = None,
        max_resident_waits: int | None = None,
        evict_waits_after: float | None = None,
        version: str | None = None,
    ) -> ExecutorSettings:
        """The settings from the environment; the keyword arguments (the command line's) win
        unless None."""
        d = cls(modules=modules)
        return cls(
            modules=modules,
            api_url=os.environ.get("RUNPLANE_API_URL") or d.api_url,
            secret_key=os.environ.get("RUNPLANE_WORKER_KEY")
            or os.environ.get("RUNPLANE_SECRET_KEY", ""),
            processes=_int("RUNPLANE_EXECUTOR_PROCESSES", d.processes)
            if processes is None
            else processes,
            capacity=_int("RUNPLANE_EXECUTOR_CAPACITY", d.capacity)
            if capacity is None
            else capacity,
            listen=os.environ.get("RUNPLANE_EXECUTOR_LISTEN") or d.listen,
            cancel_grace=_float("RUNPLANE_CANCEL_GRACE", d.cancel_grace),
            max_resident_waits=_int("RUNPLANE_EXECUTOR_MAX_RESIDENT_WAITS", d.max_resident_waits)
            if max_resident_waits is None
            else max_resident_waits,
            evict_waits_after=_float("RUNPLANE_EXECUTOR_EVICT_WAITS_AFTER", d.evict_waits_after)
            if evict_waits_after is None
            else evict_waits_after,
            tls=TlsSettings.from_env(os.environ),
            output_limit=_int("RUNPLANE_LIMIT_OUTPUT_BYTES", d.output_limit),
            version=os.environ.get("RUNPLANE_VERSION", "") if version is None else version,
            http_listen=os.environ.get("RUNPLANE_EXECUTOR_HTTP_LISTEN", ""),
        )


@dataclass(frozen=True)
class DashboardSettings:
    """The web dashboard (``runplane dashboard``): where it listens, and the API it is a client
    of. Users log in with a secret key; the dashboard holds no key of its own."""

    # host:port of the dashboard's HTTP server (RUNPLANE_DASHBOARD_LISTEN).
    listen: str = "127.0.0.1:7073"
    # The scheduler's gRPC API (RUNPLANE_API_URL).
    api_url: str = DEFAULT_API_URL
    # The realtime service's HTTP base URL for its SSE feeds (RUNPLANE_REALTIME_HTTP_URL); empty:
    # what the scheduler announces.
    realtime_http_url: str = ""
    # A session ends after this long without a request (seconds).
    session_idle_timeout: float = 12 * 3600.0
    # TLS to the scheduler and the realtime service, and on the dashboard's own port when a
    # certificate is set (RUNPLANE_TLS_*; see runplane.tls).
    tls: TlsSettings = field(default_factory=TlsSettings)

    @classmethod
    def from_env(cls) -> DashboardSettings:
        d = cls()
        return cls(
            listen=os.environ.get("RUNPLANE_DASHBOARD_LISTEN") or d.listen,
            api_url=os.environ.get("RUNPLANE_API_URL") or d.api_url,
            realtime_http_url=os.environ.get("RUNPLANE_REALTIME_HTTP_URL", ""),
            tls=TlsSettings.from_env(os.environ),
        )
