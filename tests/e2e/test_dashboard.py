"""The web dashboard in a real browser (Debian's chromium driven by Playwright) against the
services as processes: log in with a secret key, watch runs change live on the list and on a
run's page, read a run's waterfall, cancel a run, pause a queue; and no route gives anything
to a request without a session."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

import runplane
from runplane_cli.dev import wait_http
from runplane_common.config import DashboardSettings
from runplane_dashboard.app import Dashboard
from tests.helpers.cluster import ROOT, Cluster, ServiceProcess
from tests.helpers.ports import free_port
from tests.helpers.wait import eventually

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    # The browser tests need one database; GetRunTimeline has SQLite and PostgreSQL contract
    # coverage.
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

CLUSTER_TASKS = "tests.e2e.dashboard_tasks"
ARTIFACTS = ROOT / "tests" / ".artifacts"
UI_TIMEOUT = 20_000  # ms


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(path).exists(), "chromium is missing: scripts/setup.sh installs it (apt)"
    return path


@pytest.fixture
async def dashboard(cluster: Cluster, tmp_path: Path) -> AsyncIterator[str]:
    """``runplane dashboard`` as a process against the cluster; yields its base URL."""
    listen = f"127.0.0.1:{free_port()}"
    env = {**cluster.env, "RUNPLANE_DASHBOARD_LISTEN": listen}
    process = ServiceProcess(
        "dashboard", [sys.executable, "-m", "runplane_cli", "dashboard"], env, tmp_path
    )
    process.start()
    try:
        await wait_http(f"http://{listen}/login", 60)
        yield f"http://{listen}"
    finally:
        await process.stop()
        print(process.log()[-4000:])


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        # Playwright's own browser download is not used: the system chromium is.
        launched = await p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


async def _log_in(page: Page, base: str, key: str) -> None:
    await page.goto(f"{base}/runs")
    await expect(page.get_by_role("heading", name="Log in to runplane")).to_be_visible()
    await page.get_by_label("Secret key").fill(key)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()


async def _mark(page: Page) -> None:
    """A value that survives only while the page is not reloaded."""
    await page.evaluate("window.__notReloaded = true")


async def _not_reloaded(page: Page) -> bool:
    return bool(await page.evaluate("window.__notReloaded === true"))


def _status(page: Page, run_id: str) -> object:
    return page.locator(f'tr[data-run-id="{run_id}"] .status')


async def test_log_in_watch_runs_live_read_the_waterfall_cancel_and_pause(
    cluster: Cluster, dashboard: str, browser: Browser
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    client = cluster.client()
    waits = runplane.WaitAPI(client)
    token = await waits.create_token(timeout="10m")
    parent = await client.tasks.trigger("dash-parent", {"token": token.id})

    async def waiting_for_the_token() -> bool:
        timeline = await client.runs.timeline(parent.id)
        return any(w.kind == "TOKEN" and w.finished_at is None for w in timeline.waits)

    await eventually(waiting_for_the_token, 60, description="the parent waits for its token")

    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT)
    listing = await context.new_page()
    await _log_in(listing, dashboard, cluster.keys["dev"])
    await expect(listing.locator("#environment")).to_have_text("dev")
    [cookie] = [c for c in await context.cookies() if c["name"] == "runplane_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
    await expect(_status(listing, parent.id)).to_have_attribute("data-status", "WAITING")
    await _mark(listing)

    run_page = await context.new_page()
    await run_page.goto(f"{dashboard}/runs/{parent.id}")
    await expect(run_page.locator("#run-status")).to_have_text("WAITING")
    await _mark(run_page)

    # The token completes: both pages follow the run to COMPLETED without a reload.
    await waits.complete_token(token.id, {"approved": True})
    await expect(_status(listing, parent.id)).to_have_attribute(
        "data-status", "COMPLETED", timeout=30_000
    )
    assert await _not_reloaded(listing)
    await expect(run_page.locator("#run-status")).to_have_text("COMPLETED", timeout=30_000)
    assert await _not_reloaded(run_page)

    # A run triggered now appears on the list's first page and is followed to its end.
    fresh = await client.tasks.trigger("dash-sleepy", {"seconds": 0.5})
    await expect(_status(listing, fresh.id)).to_have_attribute(
        "data-status", "COMPLETED", timeout=30_000
    )
    assert await _not_reloaded(listing)
    await listing.screenshot(path=str(ARTIFACTS / "dashboard-runs.png"), full_page=True)

    # The waterfall: the run, its queue time, its attempt(s) with log marks, its three waits
    # (a duration, the child run, the token) and the child run's bar, which links to it.
    waterfall = run_page.locator("#waterfall")
    await expect(waterfall.locator('.bar[data-kind="run"]')).to_have_count(1)
    assert await waterfall.locator('.bar[data-kind="attempt"]').count() >= 1
    await expect(waterfall.locator('.bar[data-kind="child"]')).to_have_count(1)
    await expect(waterfall.locator('.bar[data-kind="wait"]')).to_have_count(3)
    await expect(waterfall.locator('.bar[data-kind="queued"]').first).to_be_attached()
    await expect(waterfall.locator(".log-mark").first).to_be_attached()
    await expect(run_page.locator("#logs")).to_contain_text("token completed")
    await expect(run_page.get_by_label("output", exact=True)).to_contain_text('"approved": true')
    await run_page.screenshot(path=str(ARTIFACTS / "dashboard-run.png"), full_page=True)
    [child] = (await client.runs.timeline(parent.id)).children
    await waterfall.get_by_role("link", name="Child run dash-child").click()
    await expect(run_page.get_by_role("heading", name=f"Run {child.id}")).to_be_visible()
    await expect(run_page.locator("#run-status")).to_have_text("COMPLETED")
    await expect(run_page.get_by_role("link", name=parent.id).first).to_be_visible()

    # Cancel a running run from its page.
    sleepy = await client.tasks.trigger("dash-sleepy", {"seconds": 120})
    await run_page.goto(f"{dashboard}/runs/{sleepy.id}")
    await expect(run_page.locator("#run-status")).to_have_text("EXECUTING", timeout=30_000)
    await run_page.get_by_role("button", name="Cancel run").click()
    await expect(run_page.locator("#run-status")).to_have_text("CANCELED")
    assert (await client.runs.retrieve(sleepy.id)).status is runplane.RunStatus.CANCELED
    await run_page.screenshot(path=str(ARTIFACTS / "dashboard-canceled.png"))

    # Replay it: a new run of the same task and payload, whose page says so.
    await run_page.get_by_role("button", name="Replay run").click()
    await expect(run_page.get_by_role("status")).to_contain_text(f"Replay of {sleepy.id}")
    replay_id = run_page.url.split("/runs/")[1].split("?")[0]
    replay = await client.runs.retrieve(replay_id)
    assert replay.replayed_from_run_id == sleepy.id and replay.payload == {"seconds": 120}
    await client.runs.cancel(replay_id)

    # Reschedule a delayed run (the form is there for DELAYED runs only).
    delayed = await client.tasks.trigger("dash-sleepy", {"seconds": 1}, delay="10m")
    await run_page.goto(f"{dashboard}/runs/{delayed.id}")
    await expect(run_page.locator("#run-status")).to_have_text("DELAYED")
    before = (await client.runs.retrieve(delayed.id)).delay_until
    await run_page.get_by_label("Start in (seconds)").fill("3600")
    await run_page.get_by_role("button", name="Reschedule").click()
    await expect(run_page.get_by_role("status")).to_contain_text("now starts at")
    after = (await client.runs.retrieve(delayed.id)).delay_until
    assert before is not None and after is not None and after > before
    await client.runs.cancel(delayed.id)
    await run_page.goto(f"{dashboard}/runs/{delayed.id}")
    await expect(run_page.get_by_role("button", name="Reschedule")).to_have_count(0)

    # Pause a queue.
    await listing.goto(f"{dashboard}/queues")
    row = listing.locator('tr[data-queue="task/dash-sleepy"]')
    await row.get_by_role("button", name="Pause").click()
    await expect(listing.locator('tr[data-queue="task/dash-sleepy"] .paused')).to_have_text(
        "paused"
    )
    assert (await client.queues.retrieve("task/dash-sleepy")).paused
    row = listing.locator('tr[data-queue="task/dash-sleepy"]')
    await row.get_by_label("Limit for task/dash-sleepy").fill("3")
    await row.get_by_role("button", name="Override").click()
    await expect(listing.get_by_role("status")).to_contain_text("limit 3")
    assert (await client.queues.retrieve("task/dash-sleepy")).override_concurrency_limit == 3
    await listing.screenshot(path=str(ARTIFACTS / "dashboard-queues.png"), full_page=True)

    # Log out: the session is gone.
    await listing.get_by_role("button", name="Log out").click()
    await expect(listing.get_by_role("heading", name="Log in to runplane")).to_be_visible()
    await listing.goto(f"{dashboard}/runs/{parent.id}")
    await expect(listing.get_by_role("heading", name="Log in to runplane")).to_be_visible()
    assert parent.id not in await listing.locator("main").inner_text()
    await context.close()
    await client.close()


async def test_batch_token_schedule_and_version_pages(
    cluster: Cluster, dashboard: str, browser: Browser
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    client = cluster.client()
    waits = runplane.WaitAPI(client)
    batch = await client.tasks.batch_trigger(
        "dash-sleepy", [{"payload": {"seconds": 0.1}}, {"payload": {"seconds": 0.2}}]
    )
    token = await waits.create_token(timeout="10m", tags=["by-hand"])
    schedule = await client.schedules.create(task="dash-sleepy", cron="0 * * * *")
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(UI_TIMEOUT)
    page = await context.new_page()
    await _log_in(page, dashboard, cluster.keys["dev"])

    # A batch's runs, followed until they complete.
    await page.get_by_role("link", name="Batches").click()
    await page.get_by_label("Batch id").fill(batch.batch_id)
    await page.get_by_role("button", name="Open").click()
    await expect(page.get_by_role("heading", name=f"Batch {batch.batch_id}")).to_be_visible()
    for handle in batch.runs:
        await expect(_status(page, handle.id)).to_have_attribute(
            "data-status", "COMPLETED", timeout=30_000
        )

    # A wait token completed by hand: bad JSON is refused, good JSON completes it.
    await page.get_by_role("link", name="Wait tokens").click()
    data = page.get_by_label(f"JSON data for {token.id}")
    await data.fill("{not json")
    await page.locator(f'tr[data-token="{token.id}"]').get_by_role("button").click()
    await expect(page.get_by_role("alert")).to_contain_text("is not JSON")
    assert (await waits.retrieve_token(token.id)).status == "WAITING"
    await page.get_by_label(f"JSON data for {token.id}").fill('{"approved": "by hand"}')
    await page.locator(f'tr[data-token="{token.id}"]').get_by_role("button").click()
    await expect(page.get_by_role("status")).to_contain_text(f"Token {token.id} is COMPLETED")
    done = await waits.retrieve_token(token.id)
    assert done.status == "COMPLETED" and done.output == {"approved": "by hand"}

    # A schedule: its next tick, deactivated and activated again.
    await page.get_by_role("link", name="Schedules").click()
    row = page.locator(f'tr[data-schedule="{schedule.id}"]')
    await expect(row.locator("time").first).to_be_attached()
    await row.get_by_role("button", name="Deactivate").click()
    await expect(page.get_by_role("status")).to_contain_text("inactive")
    assert not (await client.schedules.retrieve(schedule.id)).active
    await (
        page.locator(f'tr[data-schedule="{schedule.id}"]')
        .get_by_role("button", name="Activate")
        .click()
    )
    await expect(page.get_by_role("status")).to_contain_text(f"Schedule {schedule.id} is active")
    assert (await client.schedules.retrieve(schedule.id)).active

    # Versions: the executor's version is current and holds the runs locked to it; rolling
    # back with nothing to roll back to is refused, saying why.
    [version] = await client.versions.list()
    await page.get_by_role("link", name="Versions").click()
    row = page.locator(f'tr[data-version="{version.version}"]')
    await expect(row).to_contain_text("current")
    await row.get_by_role("link", name=re.compile("runs held")).click()
    await expect(page.get_by_label("Version")).to_have_value(version.version)
    await expect(_status(page, batch.runs[0].id)).to_be_visible()
    await page.get_by_role("link", name="Versions").click()
    await page.get_by_role("button", name="Roll back the latest promotion").click()
    await expect(page.get_by_role("alert")).to_be_visible()
    await page.screenshot(path=str(ARTIFACTS / "dashboard-versions.png"), full_page=True)
    await context.close()
    await client.close()


def _every_route(run_id: str) -> list[tuple[str, str]]:
    """(method, path) of every route of the dashboard, with real ids in them."""
    app = Dashboard(DashboardSettings()).app
    out = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical if route.resource is not None else ""
        path = re.sub(r"\{run_id\}", run_id, path)
        path = re.sub(r"\{[a-z_]+\}", "x", path)
        out.append((route.method, path))
    return out


async def _session(http: aiohttp.ClientSession, base: str, key: str) -> tuple[int, str]:
    """Log in with ``key`` as a browser would; the status and the page it ends on."""
    async with http.get(f"{base}/login") as response:
        form = await response.text()
    match = re.search(r'name="csrf" value="([^"]+)"', form)
    assert match, form
    async with http.post(
        f"{base}/login", data={"csrf": match.group(1), "key": key, "next": "/runs"}
    ) as response:
        return response.status, await response.text()


async def test_every_route_refuses_requests_without_a_session_and_sessions_are_per_environment(
    cluster: Cluster, dashboard: str
) -> None:
    client = cluster.client()
    handle = await client.tasks.trigger("dash-sleepy", {"seconds": 0.1}, tags=["secret-tag"])
    run_id = handle.id
    routes = _every_route(run_id)
    assert ("GET", f"/runs/{run_id}") in routes and ("POST", "/logout") in routes, routes

    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        for cookie in ({}, {"runplane_session": "forged"}):
            for method, path in routes:
                if path == "/login" or path.startswith("/assets/"):
                    continue
                async with http.request(
                    method, f"{dashboard}{path}", cookies=cookie, allow_redirects=False
                ) as response:
                    body = await response.text()
                    what = f"{method} {path} with {cookie}: {response.status} {body[:300]}"
                    assert response.status == 401, what
                    # The run's data never shows (its id may: the login page returns to the URL).
                    assert "secret-tag" not in body and "dash-sleepy" not in body, what
                    if path.endswith("/events") or path.startswith("/api/"):
                        assert response.content_type == "application/json", what
                        assert "UNAUTHENTICATED" in body, what
                    else:
                        assert response.content_type == "text/html", what
                        assert 'name="key"' in body, what

        # Keys that may not log in get the login page again, saying why.
        for key, why in (
            ("rp_nonsense", "not accepted"),
            (cluster.worker_keys["dev"], "not a worker key"),
        ):
            status, page = await _session(http, dashboard, key)
            assert status == 401 and why in page, page
        jar.clear()

        # A prod session sees prod only: the dev run is not found, and its data not shown.
        status, page = await _session(http, dashboard, cluster.keys["prod"])
        assert status == 200 and 'id="environment">prod<' in page, page
        async with http.get(f"{dashboard}/runs/{run_id}") as response:
            body = await response.text()
            assert response.status == 404 and "secret-tag" not in body, body
        async with http.get(f"{dashboard}/runs") as response:
            assert run_id not in await response.text()

        # A POST without the session's CSRF token is refused and changes nothing.
        jar.clear()
        status, page = await _session(http, dashboard, cluster.keys["dev"])
        assert status == 200 and run_id in page, page
        sleepy = await client.tasks.trigger("dash-sleepy", {"seconds": 60})
        async with http.post(f"{dashboard}/runs/{sleepy.id}/cancel", data={}) as response:
            assert response.status == 403, await response.text()
        async with http.post(
            f"{dashboard}/runs/{sleepy.id}/cancel", data={"csrf": "guessed"}
        ) as response:
            assert response.status == 403, await response.text()
        assert not (await client.runs.retrieve(sleepy.id)).is_completed
        await client.runs.cancel(sleepy.id)
    await client.close()
