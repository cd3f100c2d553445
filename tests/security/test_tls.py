"""TLS (RUNPLANE_TLS_CERT, RUNPLANE_TLS_KEY, RUNPLANE_TLS_CA): a whole cluster over TLS, gRPC and
HTTP; plaintext clients refused; mutual TLS for executors; ``runplane dev --tls``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import runplane
from runplane import RunStatus
from runplane.tls import TlsSettings, open_channel
from runplane.v1 import meta_service_pb2, meta_service_pb2_grpc, worker_service_pb2_grpc
from runplane.v1 import worker_service_pb2 as wpb
from runplane_cli.dev import DevCertificates, make_dev_certificates, read_env_file, tls_env
from runplane_common.config import SchedulerSettings
from runplane_scheduler.app import Scheduler, start_scheduler
from runplane_scheduler.keys import create_key
from tests.helpers.cluster import ROOT, Cluster
from tests.helpers.node import node_env, run_node_tests, summary
from tests.helpers.registration import register_in
from tests.helpers.wait import eventually


@pytest.fixture
def certs(tmp_path: Path) -> DevCertificates:
    return make_dev_certificates(tmp_path / "tls")


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    return int(reply.status)


async def _plaintext_refused(address: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _health(channel)
    return info.value.code()


async def _sse_until_end(session: aiohttp.ClientSession, url: str, key: str) -> list[Any]:
    """The run events of an SSE stream read to its ``end`` event."""
    runs = []
    async with session.get(url, headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status == 200, await response.text()
        event = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                if event in ("end", "error"):
                    assert event == "end", line
                    return runs
                if event == "run":
                    runs.append(json.loads(line.removeprefix("data: ")))
    raise AssertionError("the SSE stream ended without an end event")


@pytest.fixture(params=["tls", "mutual-tls"])
async def tls_cluster(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    nats_server: Any,
    certs: DevCertificates,
) -> AsyncIterator[Cluster]:
    """Scheduler, realtime and an executor as processes, every port over TLS (SQLite: the
    database plays no part in TLS); with mutual TLS every gRPC port requires a client
    certificate, and the services present theirs to each other."""
    env = tls_env(certs.server)
    if request.param == "mutual-tls":
        env["RUNPLANE_TLS_REQUIRE_CLIENT_CERT"] = "1"
    c = Cluster(
        tmp_path,
        nats_server.url,
        f"sqlite+aiosqlite:///{tmp_path / 'runplane.db'}",
        tasks=["examples.waits", "tests.e2e.node_tasks"],  # the latter for the Node package
        env=env,
    )
    await c.start()
    try:
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        await c.stop()


@pytest.mark.e2e
@pytest.mark.timeout(150)
async def test_a_cluster_over_tls_runs_a_task_followed_by_the_sdk_and_sse(
    tls_cluster: Cluster, certs: DevCertificates
) -> None:
    cluster = tls_cluster
    client = cluster.client()
    # The scheduler announces HTTPS addresses: realtime's HTTP port and wait token URLs.
    meta = meta_service_pb2_grpc.MetaServiceStub(client.transport.channel())
    info = await client.transport.call(meta.GetServerInfo, meta_service_pb2.GetServerInfoRequest())
    assert info.realtime_http_url == cluster.realtime_http_url
    assert info.realtime_http_url.startswith("https://")
    assert info.http_url.startswith("https://")
    token = await runplane.WaitAPI(client).create_token(timeout="10m")
    assert token.url.startswith("https://")

    handle = await client.tasks.trigger("token-waiter", {"token": token.id})
    statuses: list[RunStatus] = []

    async def follow() -> None:
        async for run in client.runs.subscribe_to_run(handle.id):  # realtime's gRPC port
            statuses.append(run.status)

    https = certs.client.client_ssl_context()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=https)) as session:
        url = f"{cluster.realtime_http_url}/realtime/v1/runs/{handle.id}"
        sse = asyncio.create_task(_sse_until_end(session, url, client.secret_key))
        followed = asyncio.create_task(follow())
        await eventually(
            lambda: RunStatus.WAITING in statuses, 60, description="WAITING, seen through the SDK"
        )
        async with session.post(token.url, json={"approved": True}) as response:
            assert response.status == 200, await response.text()
        runs = await asyncio.wait_for(sse, 60)
        await asyncio.wait_for(followed, 60)

        # Plaintext HTTP to the HTTPS ports gets no answer.
        plain = cluster.realtime_http_url.replace("https://", "http://")
        with pytest.raises(aiohttp.ClientError):
            await session.get(f"{plain}/realtime/v1/runs/{handle.id}")
        with pytest.raises(aiohttp.ClientError):
            await session.post(token.url.replace("https://", "http://"), json={})

    assert statuses[-1] is RunStatus.COMPLETED, cluster.logs()
    assert runs[-1]["status"] == "RUN_STATUS_COMPLETED"
    assert runs[-1]["output"] == {"ok": True, "output": {"approved": True}}
    assert (await client.runs.retrieve(handle.id)).output == runs[-1]["output"]
    # Plaintext gRPC to every service is refused; with mutual TLS, TLS without a certificate too.
    for address in (cluster.api_url, cluster.realtime_url, cluster.executor_status_url):
        assert await _plaintext_refused(address) is grpc.StatusCode.UNAVAILABLE
        async with open_channel(address, TlsSettings(ca=certs.server.ca)) as anonymous:
            if cluster.tls.require_client_cert:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _health(anonymous)
                assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            else:
                assert await _health(anonymous) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_the_node_package_speaks_tls(tls_cluster: Cluster) -> None:
    """The Node package's integration suite (client, realtime, and a worker over
    WorkerService.Connect) with the cluster's CA (and, for mutual TLS, its certificate)."""
    cluster = tls_cluster
    env = node_env(cluster)  # RUNPLANE_TLS_*: the CA, and a certificate for mutual TLS
    code, out = await run_node_tests(env, "test/client.integration.test.mjs")
    counts = summary(out)
    assert code == 0 and counts["skipped"] == 0 and counts["pass"] > 10, out
    # Without the CA it speaks plaintext, which the cluster refuses: the HTTP/2 connection is
    # closed under the call (connect-node reports CANCELLED, grpc-js UNAVAILABLE).
    del env["RUNPLANE_TLS_CA"]
    code, out = await run_node_tests(
        env, "--test-name-pattern=typed errors", "test/client.integration.test.mjs"
    )
    assert code != 0 and re.search(r"(UNAVAILABLE|CANCELLED): http/2", out), out


@pytest.fixture
async def scheduler_factory(tmp_path: Path, nats_server: Any) -> AsyncIterator[Any]:
    started: list[Scheduler] = []

    async def start(tls: TlsSettings) -> Scheduler:
        s = await start_scheduler(
            SchedulerSettings(
                database_url=f"sqlite+aiosqlite:///{tmp_path / 'runplane.db'}",
                nats_url=nats_server.url,
                listen="127.0.0.1:0",
                tls=tls,
            )
        )
        started.append(s)
        return s

    yield start
    for s in started:
        await s.stop()


@pytest.mark.timeout(60)
async def test_a_tls_scheduler_refuses_a_plaintext_client(
    scheduler_factory: Any, certs: DevCertificates
) -> None:
    s = await scheduler_factory(certs.server)
    address = f"127.0.0.1:{s.port}"
    assert await _plaintext_refused(address) is grpc.StatusCode.UNAVAILABLE
    key = await create_key(s.engine_db, "dev")
    await register_in(s, "dev", ("not-deployed",), TlsSettings(ca=str(certs.ca)))
    plain = runplane.Client(api_url=address, secret_key=key, tls_ca="", tls_cert="", tls_key="")
    with pytest.raises(runplane.UnavailableError):
        await plain.tasks.trigger("not-deployed", None)
    # A client trusting another CA refuses the scheduler's certificate.
    other = make_dev_certificates(Path(certs.ca).parent / "other")
    stranger = runplane.Client(api_url=address, secret_key=key, tls_ca=str(other.ca))
    with pytest.raises(runplane.UnavailableError):
        await stranger.tasks.trigger("not-deployed", None)
    # The SDK with the CA (and nothing else) talks TLS; a grpcs:// URL too.
    ok = runplane.Client(api_url=address, secret_key=key, tls_ca=str(certs.ca))
    handle = await ok.tasks.trigger("not-deployed", {"n": 1})
    assert (await ok.runs.retrieve(handle.id)).payload == {"n": 1}
    by_url = runplane.Client(
        api_url=f"grpcs://localhost:{s.port}", secret_key=key, tls_ca=str(certs.ca)
    )
    assert (await by_url.runs.retrieve(handle.id)).payload == {"n": 1}


async def _connect(channel: grpc.aio.Channel, key: str) -> str:
    """The first message of a worker stream, or its status code."""
    stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
    register = wpb.Register(executor_id="tls-test", manifest=wpb.Manifest(), capacity=1)
    stay = asyncio.Event()

    async def requests() -> AsyncIterator[wpb.ConnectRequest]:
        yield wpb.ConnectRequest(register=register)
        await stay.wait()

    call = stub.Connect(requests(), metadata=(("authorization", f"Bearer {key}"),), timeout=10)
    try:
        response = await call.read()
        return str(response.WhichOneof("message"))
    except grpc.aio.AioRpcError as error:
        return str(error.code().name)
    finally:
        stay.set()
        call.cancel()


@pytest.mark.timeout(60)
async def test_mutual_tls_refuses_an_executor_without_a_client_certificate(
    scheduler_factory: Any, certs: DevCertificates
) -> None:
    mutual = TlsSettings(
        cert=certs.server.cert, key=certs.server.key, ca=certs.server.ca, require_client_cert=True
    )
    s = await scheduler_factory(mutual)
    address = f"127.0.0.1:{s.port}"
    worker_key = await create_key(s.engine_db, "dev", kind="worker")
    anonymous = TlsSettings(ca=certs.ca.as_posix())
    async with open_channel(address, anonymous) as channel:
        assert await _connect(channel, worker_key) == "UNAVAILABLE"
    # A certificate from another CA is no better.
    other = make_dev_certificates(certs.ca.parent / "other")
    foreign = TlsSettings(cert=other.client.cert, key=other.client.key, ca=certs.server.ca)
    async with open_channel(address, foreign) as channel:
        assert await _connect(channel, worker_key) == "UNAVAILABLE"
    async with open_channel(address, certs.client) as channel:
        assert await _connect(channel, worker_key) == "registered"
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_dev_certificates_are_private_and_name_the_local_host(certs: DevCertificates) -> None:
    from cryptography import x509

    files = (certs.ca, certs.server_cert, certs.server_key, certs.client_cert, certs.client_key)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    assert not (certs.ca.parent / "ca.key").exists()


@pytest.mark.e2e
@pytest.mark.timeout(150)
async def test_dev_tls_runs_everything_over_tls(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPLANE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "sdk"), str(ROOT / "services"), str(ROOT)])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runplane_cli", "dev", "--tls", "--tasks", "examples.hello",
        "--port", "0", "--trigger", "hello-world", "--payload", '{"name": "tls"}', "--exit",
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "Hello, tls!" in text and "COMPLETED" in text, text
    settings = read_env_file(tmp_path / ".runplane" / "dev.env")
    assert settings["RUNPLANE_REALTIME_HTTP_URL"].startswith("https://")
    for name in ("RUNPLANE_TLS_CA", "RUNPLANE_TLS_CERT", "RUNPLANE_TLS_KEY"):
        path = Path(settings[name])
        assert path.is_file() and path.parent == tmp_path / ".runplane" / "tls", name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


@pytest.mark.timeout(10)
async def test_tls_settings_that_cannot_work_are_refused(tmp_path: Path) -> None:
    assert TlsSettings.from_env({}) == TlsSettings()  # nothing set: plaintext
    assert not TlsSettings.from_env({}).serves_tls
    with pytest.raises(runplane.ConfigurationError, match="go together"):
        TlsSettings.from_env({"RUNPLANE_TLS_CERT": "server.pem"})
    with pytest.raises(runplane.ConfigurationError, match="RUNPLANE_TLS_CA"):
        TlsSettings.from_env(
            {
                "RUNPLANE_TLS_CERT": "server.pem",
                "RUNPLANE_TLS_KEY": "server.key",
                "RUNPLANE_TLS_REQUIRE_CLIENT_CERT": "1",
            }
        )
    missing = str(tmp_path / "missing.pem")
    client = runplane.Client(api_url="127.0.0.1:1", secret_key="k", tls_ca=missing)
    with pytest.raises(runplane.ConfigurationError, match=r"missing\.pem"):
        await client.tasks.trigger("any", None)
