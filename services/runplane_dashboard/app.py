"""The dashboard's HTTP server (aiohttp): routes, the session middleware, and ``main()``.

Every route but the login form and the static assets needs a session: without one, a page
request gets the login page (HTTP 401) and an API or SSE request a JSON 401, never data. Every
POST carries the session's CSRF token (the login form a token of its own, in a cookie).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from runplane import (
    ApiError,
    Client,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    Run,
    RunplaneError,
    RunStatus,
    UnauthenticatedError,
    WaitAPI,
)
from runplane.v1 import meta_service_pb2, meta_service_pb2_grpc
from runplane.worker import configure_logging, run_async
from runplane_common.config import DashboardSettings
from runplane_dashboard import assets, feeds, pages
from runplane_dashboard.markup import page, query
from runplane_dashboard.sessions import COOKIE, Session, Sessions

log = logging.getLogger("runplane.dashboard")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOGIN_CSRF_COOKIE = "runplane_login_csrf"
SESSION_KEY = web.RequestKey("session", Session)
PUBLIC_PATHS = ("/login", "/assets/")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
        "base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class LoginError(Exception):
    """A key that may not log in; the message says why."""


def _wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return (
        request.path.startswith("/api/")
        or request.path.endswith("/events")
        or "text/event-stream" in accept
        or ("application/json" in accept and "text/html" not in accept)
    )


def _unauthenticated(request: web.Request) -> web.Response:
    if _wants_json(request):
        return web.json_response(
            {"error": {"code": "UNAUTHENTICATED", "message": "log in to the dashboard first"}},
            status=401,
        )
    return _login_response(request, "", status=401)


def _login_response(
    request: web.Request, message: str, status: int = 200, next_path: str | None = None
) -> web.Response:
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
    if next_path is None:
        next_path = request.path_qs if request.method == "GET" else "/runs"
    response = web.Response(
        text=page("Log in", pages.login(message, _safe_next(next_path), token)),
        content_type="text/html",
        status=status,
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE, token, httponly=True, samesite="Strict", path="/", max_age=3600
    )
    return response


def _safe_next(path: str) -> str:
    """Only a path on this site (no scheme, no host): no open redirect."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/runs"
    bare = path.split("?", 1)[0]
    if bare.startswith(("/login", "/logout", "/assets/", "/api/")) or bare.endswith("/events"):
        return "/runs"
    return path


class Dashboard:
    """The dashboard app: its session store and the HTTP client that follows realtime feeds."""

    def __init__(self, settings: DashboardSettings) -> None:
        self.settings = settings
        self.sessions = Sessions(settings.session_idle_timeout)
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.app = web.Application(middlewares=[self._middleware])
        self.app.add_routes(
            [
                web.get("/", self._home),
                web.get("/login", self._login_form),
                web.post("/login", self._login),
                web.post("/logout", self._logout),
                web.get("/assets/dashboard.css", self._css),
                web.get("/assets/dashboard.js", self._js),
                web.get("/api/session", self._session_info),
                web.get("/runs", self._runs),
                web.get("/runs/events", self._runs_events),
                web.get("/runs/table", self._runs_table),
                web.get("/runs/{run_id}", self._run),
                web.get("/runs/{run_id}/live", self._run_live),
                web.get("/runs/{run_id}/events", self._run_events),
                web.get("/api/runs/{run_id}/timeline", self._run_timeline_json),
                web.post("/runs/{run_id}/cancel", self._cancel),
                web.post("/runs/{run_id}/replay", self._replay),
                web.post("/runs/{run_id}/reschedule", self._reschedule),
                web.get("/batches", self._batches),
                web.get("/batches/{batch_id}", self._batch),
                web.get("/batches/{batch_id}/events", self._batch_events),
                web.get("/queues", self._queues),
                web.post("/queues/{queue_id}/{action}", self._queue_action),
                web.get("/schedules", self._schedules),
                web.post("/schedules/{schedule_id}/{action}", self._schedule_action),
                web.get("/waitpoints", self._waitpoints),
                web.post("/waitpoints/{token_id}/complete", self._complete_token),
                web.get("/versions", self._versions),
                web.post("/versions/rollback", self._rollback),
                web.post("/versions/{version}/promote", self._promote),
            ]
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, address: str | None = None) -> int:
        """Listen on ``address`` (default: the settings'); returns the port (for port 0)."""
        tls = self.settings.tls
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                ssl=tls.client_ssl_context() if tls.ca or tls.cert else True
            )
        )
        host, port = (address or self.settings.listen).rsplit(":", 1)
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            host,
            int(port),
            ssl_context=tls.server_ssl_context() if tls.serves_tls else None,
        )
        await site.start()
        self._sweeper = asyncio.create_task(self._sweep())
        bound: int = self._runner.addresses[0][1]
        return bound

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for session in self.sessions.all():
            self.sessions.drop(session.id)
            await session.client.close()
        if self._http is not None:
            await self._http.close()

    async def _sweep(self) -> None:
        """Close the clients of sessions that expired."""
        while True:
            await asyncio.sleep(60)
            for session in self.sessions.expired():
                await session.client.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "the dashboard is not started"
        return self._http

    # -- the middleware: sessions, CSRF, security headers, errors --------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await self._guarded(request, handler)
        if not response.prepared:
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
        return response

    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/login" or request.path.startswith("/assets/"):
            return await handler(request)
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            return _unauthenticated(request)
        if request.method == "POST":
            form = await request.post()
            token = str(form.get("csrf", "")) or request.headers.get("X-CSRF-Token", "")
            if not token or not session.csrf_ok(token):
                return web.Response(
                    text=page(
                        "Refused",
                        pages.not_found(
                            "Missing or stale form token: reload the page and try again."
                        ),
                    ),
                    content_type="text/html",
                    status=403,
                )
        request[SESSION_KEY] = session
        try:
            return await handler(request)
        except UnauthenticatedError:
            # The key was revoked since the login: the session is over.
            self.sessions.drop(session.id)
            await session.client.close()
            return _unauthenticated(request)
        except NotFoundError as error:
            return self._page(request, "Not found", pages.not_found(error.message), status=404)

    def _page(
        self, request: web.Request, title: str, body: str, status: int = 200, current: str = ""
    ) -> web.Response:
        session = request[SESSION_KEY]
        return web.Response(
            text=page(
                title, body, environment=session.environment, csrf=session.csrf, current=current
            ),
            content_type="text/html",
            status=status,
        )

    # -- login -----------------------------------------------------------------------------------

    async def _login_form(self, request: web.Request) -> web.StreamResponse:
        if self.sessions.get(request.cookies.get(COOKIE)) is not None:
            raise web.HTTPSeeOther(_safe_next(request.query.get("next", "/runs")))
        return _login_response(request, "", next_path=request.query.get("next", "/runs"))

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        next_path = _safe_next(str(form.get("next", "/runs")))
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        sent = str(form.get("csrf", ""))
        if not cookie or not secrets.compare_digest(cookie.encode(), sent.encode()):
            return _login_response(
                request, "The login form expired: try again.", 403, next_path=next_path
            )
        key = str(form.get("key", "")).strip()
        try:
            session = await self.log_in(key)
        except LoginError as error:
            return _login_response(request, str(error), 401, next_path=next_path)
        response = web.HTTPSeeOther(next_path)
        response.set_cookie(
            COOKIE,
            session.id,
            httponly=True,
            samesite="Strict",
            path="/",
            secure=self.settings.tls.serves_tls,
        )
        response.del_cookie(LOGIN_CSRF_COOKIE, path="/")
        raise response

    async def log_in(self, key: str) -> Session:
        """A new session for ``key``, once the API has accepted it as a secret key: the
        environment it belongs to (GetServerInfo), and a right only secret keys have (minting a
        public access token)."""
        if not key:
            raise LoginError("Enter a secret key.")
        if not all(" " < c <= "~" for c in key):
            raise LoginError("That is not a key: keys are printable ASCII without spaces.")
        tls = self.settings.tls
        client = Client(
            api_url=self.settings.api_url,
            secret_key=key,
            tls_ca=tls.ca,
            tls_cert=tls.cert,
            tls_key=tls.key,
        )
        try:
            transport = client.transport
            stub = meta_service_pb2_grpc.MetaServiceStub(transport.channel())
            info = await transport.call(stub.GetServerInfo, meta_service_pb2.GetServerInfoRequest())
            await client.auth.create_public_token(
                scopes={"read": {"tags": ["runplane-dashboard-login"]}}, expiration_time="1m"
            )
        except UnauthenticatedError:
            await client.close()
            raise LoginError("The key was not accepted (unknown or revoked).") from None
        except PermissionDeniedError:
            await client.close()
            raise LoginError(
                "That key may not use the API: log in with a secret key, not a worker key or "
                "a public access token."
            ) from None
        except RunplaneError as error:
            await client.close()
            raise LoginError(f"The API could not be reached: {error}") from None
        realtime = self.settings.realtime_http_url or info.realtime_http_url
        return self.sessions.create(client, info.environment, info.environment_id, realtime)

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        self.sessions.drop(session.id)
        await session.client.close()
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/")
        raise response

    async def _session_info(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        return web.json_response(
            {"environment": session.environment, "environment_id": session.environment_id}
        )

    # -- assets ----------------------------------------------------------------------------------

    async def _css(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=assets.CSS, content_type="text/css")

    async def _js(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=assets.JS, content_type="application/javascript")

    async def _home(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/runs")

    # -- runs ------------------------------------------------------------------------------------

    async def _runs(self, request: web.Request) -> web.StreamResponse:
        filters, page_token, runs, next_token, error = await self._runs_listing(request)
        body = pages.runs_page(runs, filters, next_token, page_token, error)
        return self._page(request, "Runs", body, 400 if error else 200, current="/runs")

    async def _runs_table(self, request: web.Request) -> web.StreamResponse:
        """The runs table alone (a list page fetches it when new runs appear)."""
        filters, page_token, runs, _, error = await self._runs_listing(request)
        live = pages.live_runs_url(runs, filters, not page_token and not error)
        return web.Response(
            text=pages.runs_table(runs, live_url=live),
            content_type="text/html",
            status=400 if error else 200,
        )

    async def _runs_listing(
        self, request: web.Request
    ) -> tuple[dict[str, str], str, list[Run], str | None, str]:
        """The filters, page token, runs and next page token of a list request, or the
        error that names a bad filter."""
        session = request[SESSION_KEY]
        filters = {k: request.query.get(k, "").strip() for k in pages.RUN_FILTERS}
        page_token = request.query.get("page_token", "")
        try:
            result = await session.client.runs.page(
                **_run_filters(filters), page_size=25, page_token=page_token or None
            )
        except (ValueError, InvalidArgumentError) as problem:
            return filters, page_token, [], None, str(problem)
        return filters, page_token, result.runs, result.next_page_token, ""

    async def _runs_events(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        ids = [i for i in request.query.get("ids", "").split(",") if i][:100]
        urls = [feeds.run_feed_url(session.realtime_http_url, i) for i in ids]
        extra = []
        newest = request.query.get("newest", "")
        if newest:
            filters = {k: request.query.get(k, "").strip() for k in pages.RUN_FILTERS}
            try:
                options = _run_filters(filters)
            except ValueError as error:
                raise web.HTTPBadRequest(text=str(error)) from None
            extra.append(_new_runs(session.client, options, newest))
        return await feeds.relay(request, self.http, urls, session.secret_key, extra=extra)

    async def _run(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        timeline = await session.client.runs.timeline(request.match_info["run_id"])
        message = request.query.get("message", "")[:200]
        return self._page(
            request, f"Run {timeline.run.id}", pages.run_page(timeline, session.csrf, message)
        )

    async def _run_live(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        timeline = await session.client.runs.timeline(request.match_info["run_id"])
        response = web.Response(
            text=pages.run_live(timeline, session.csrf), content_type="text/html"
        )
        response.headers["X-Run-Final"] = "true" if timeline.run.is_completed else "false"
        return response

    async def _run_timeline_json(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        t = await session.client.runs.timeline(request.match_info["run_id"])

        def iso(d: datetime | None) -> str | None:
            return None if d is None else d.isoformat()

        return web.json_response(
            {
                "run": {"id": t.run.id, "status": str(t.run.status), "task_id": t.run.task_id},
                "queue_intervals": [
                    {
                        "kind": i.kind,
                        "started_at": iso(i.started_at),
                        "finished_at": iso(i.finished_at),
                    }
                    for i in t.queue_intervals
                ],
                "attempts": [
                    {
                        "number": a.number,
                        "status": a.status,
                        "started_at": iso(a.started_at),
                        "finished_at": iso(a.finished_at),
                    }
                    for a in t.attempts
                ],
                "waits": [
                    {
                        "kind": w.kind,
                        "status": w.status,
                        "started_at": iso(w.started_at),
                        "finished_at": iso(w.finished_at),
                        "child_run_ids": w.child_run_ids,
                    }
                    for w in t.waits
                ],
                "children": [{"id": c.id, "status": str(c.status)} for c in t.children],
                "logs": [{"level": e.level, "message": e.message} for e in t.logs],
            },
            dumps=lambda v: orjson.dumps(v).decode(),
        )

    async def _run_events(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        url = feeds.run_feed_url(session.realtime_http_url, request.match_info["run_id"])
        return await feeds.relay(request, self.http, [url], session.secret_key)

    async def _run_action(
        self, request: web.Request, action: Callable[[Client, str], Awaitable[str]]
    ) -> web.StreamResponse:
        session = request[SESSION_KEY]
        run_id = request.match_info["run_id"]
        try:
            target, message = run_id, await action(session.client, run_id)
        except (ApiError, ValueError) as error:
            target, message = run_id, f"Refused: {error}"
        raise web.HTTPSeeOther(query(f"/runs/{target}", {"message": message}))

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        async def cancel(client: Client, run_id: str) -> str:
            run = await client.runs.cancel(run_id)
            return f"Run {run.id} is {run.status}."

        return await self._run_action(request, cancel)

    async def _replay(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        run_id = request.match_info["run_id"]
        try:
            handle = await session.client.runs.replay(run_id)
        except ApiError as error:
            message = f"Refused: {error}"
            raise web.HTTPSeeOther(query(f"/runs/{run_id}", {"message": message})) from None
        raise web.HTTPSeeOther(query(f"/runs/{handle.id}", {"message": f"Replay of {run_id}."}))

    async def _reschedule(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()

        async def reschedule(client: Client, run_id: str) -> str:
            raw = str(form.get("delay", "")).strip()
            try:
                seconds = float(raw)
            except ValueError:
                raise ValueError(f"delay {raw!r} is not a number of seconds") from None
            run = await client.runs.reschedule(run_id, delay=timedelta(seconds=seconds))
            return f"Run {run.id} now starts at {run.delay_until}."

        return await self._run_action(request, reschedule)

    # -- batches ---------------------------------------------------------------------------------

    async def _batches(self, request: web.Request) -> web.StreamResponse:
        batch_id = request.query.get("id", "").strip()
        if batch_id:
            raise web.HTTPSeeOther(f"/batches/{batch_id}")
        return self._page(
            request, "Batches", pages.batches_page(None, [], "", ""), current="/batches"
        )

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        batch_id = request.match_info["batch_id"]
        try:
            batch = await session.client.batch.retrieve(batch_id)
        except InvalidArgumentError as error:
            body = pages.batches_page(None, [], batch_id, str(error))
            return self._page(request, "Batches", body, 400, current="/batches")
        runs = [r async for r in session.client.runs.list(batch=batch.id, page_size=100)]
        body = pages.batches_page(batch, runs, batch.id, "")
        return self._page(request, f"Batch {batch.id}", body, current="/batches")

    async def _batch_events(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        url = feeds.batch_feed_url(session.realtime_http_url, request.match_info["batch_id"])
        return await feeds.relay(request, self.http, [url], session.secret_key)

    # -- queues ----------------------------------------------------------------------------------

    async def _queues(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        queues = [q async for q in session.client.queues.list(page_size=100)]
        body = pages.queues_page(
            queues,
            session.csrf,
            request.query.get("message", "")[:200],
            request.query.get("error", "")[:300],
        )
        return self._page(request, "Queues", body, current="/queues")

    async def _queue_action(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        name, action = request.match_info["queue_id"], request.match_info["action"]
        api = session.client.queues
        try:
            if action == "pause":
                q = await api.pause(name)
            elif action == "resume":
                q = await api.resume(name)
            elif action == "limit":
                form = await request.post()
                raw = str(form.get("limit", "")).strip()
                if not raw.isdigit():
                    raise ValueError(f"limit {raw!r} is not a whole number")
                q = await api.override_concurrency_limit(name, int(raw))
            elif action == "reset-limit":
                q = await api.reset_concurrency_limit(name)
            else:
                raise web.HTTPNotFound()
        except (ApiError, ValueError) as error:
            raise web.HTTPSeeOther(query("/queues", {"error": str(error)})) from None
        state = "paused" if q.paused else "running"
        raise web.HTTPSeeOther(
            query(
                "/queues",
                {"message": f"Queue {q.name}: {state}, limit {q.concurrency_limit or 'none'}."},
            )
        )

    # -- schedules -------------------------------------------------------------------------------

    async def _schedules(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        schedules = [s async for s in session.client.schedules.list(page_size=100)]
        body = pages.schedules_page(
            schedules,
            session.csrf,
            request.query.get("message", "")[:200],
            request.query.get("error", "")[:300],
        )
        return self._page(request, "Schedules", body, current="/schedules")

    async def _schedule_action(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        schedule_id, action = request.match_info["schedule_id"], request.match_info["action"]
        api = session.client.schedules
        try:
            if action == "activate":
                s = await api.activate(schedule_id)
            elif action == "deactivate":
                s = await api.deactivate(schedule_id)
            else:
                raise web.HTTPNotFound()
        except ApiError as error:
            raise web.HTTPSeeOther(query("/schedules", {"error": str(error)})) from None
        state = "active" if s.active else "inactive"
        raise web.HTTPSeeOther(query("/schedules", {"message": f"Schedule {s.id} is {state}."}))

    # -- wait tokens -----------------------------------------------------------------------------

    async def _waitpoints(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        status = request.query.get("status", "").strip().upper()
        error = request.query.get("error", "")[:300]
        tokens = []
        code = 200
        if status and status not in ("WAITING", "COMPLETED", "TIMED_OUT"):
            error, code, status = f"status {status!r} is not a token status", 400, ""
        else:
            tokens = await WaitAPI(session.client).list_tokens(status=status or None, limit=100)
        body = pages.waitpoints_page(
            tokens, status, session.csrf, request.query.get("message", "")[:200], error
        )
        return self._page(request, "Wait tokens", body, code, current="/waitpoints")

    async def _complete_token(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        token_id = request.match_info["token_id"]
        form = await request.post()
        text = str(form.get("data", "")).strip() or "null"
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as error:
            message = f"The data for {token_id} is not JSON: {error}"
            raise web.HTTPSeeOther(query("/waitpoints", {"error": message})) from None
        try:
            token = await WaitAPI(session.client).complete_token(token_id, data)
        except ApiError as error:
            raise web.HTTPSeeOther(query("/waitpoints", {"error": str(error)})) from None
        raise web.HTTPSeeOther(
            query("/waitpoints", {"message": f"Token {token.id} is {token.status}."})
        )

    # -- versions --------------------------------------------------------------------------------

    async def _versions(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        versions = await session.client.versions.list()
        body = pages.versions_page(
            versions,
            session.csrf,
            request.query.get("message", "")[:200],
            request.query.get("error", "")[:300],
        )
        return self._page(request, "Versions", body, current="/versions")

    async def _promote(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        try:
            v = await session.client.versions.promote(request.match_info["version"])
        except ApiError as error:
            raise web.HTTPSeeOther(query("/versions", {"error": str(error)})) from None
        message = f"Version {v.version} is current for {', '.join(v.current_for)}."
        raise web.HTTPSeeOther(query("/versions", {"message": message}))

    async def _rollback(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        try:
            v = await session.client.versions.rollback()
        except ApiError as error:
            raise web.HTTPSeeOther(query("/versions", {"error": str(error)})) from None
        message = f"Rolled back: version {v.version} is current again."
        raise web.HTTPSeeOther(query("/versions", {"message": message}))


# How often a list's first page asks whether a run appeared (no feed covers an environment).
NEW_RUNS_INTERVAL = 2.0


async def _new_runs(
    client: Client, options: dict[str, Any], newest: str, interval: float = NEW_RUNS_INTERVAL
) -> AsyncIterator[feeds.Event]:
    """A ``new`` event each time the newest run matching ``options`` is another one."""
    while True:
        await asyncio.sleep(interval)
        try:
            page = await client.runs.page(**options, page_size=1)
        except ApiError as error:
            yield feeds.error_event(error.code.name, error.message)
            return
        if page.runs and page.runs[0].id != newest:
            newest = page.runs[0].id
            yield feeds.Event("new", orjson.dumps({"id": newest}).decode())


def _run_filters(filters: dict[str, str]) -> dict[str, Any]:
    """runs.page keyword arguments from the filter form; ValueError names a bad one."""
    options: dict[str, Any] = {}
    if filters["status"]:
        try:
            options["status"] = RunStatus(filters["status"].upper())
        except ValueError:
            raise ValueError(f"status {filters['status']!r} is not a run status") from None
    for name in ("task", "tag", "batch", "version"):
        if filters[name]:
            options[name] = filters[name]
    for name in ("created_after", "created_before"):
        if filters[name]:
            try:
                value = datetime.fromisoformat(filters[name])
            except ValueError:
                raise ValueError(
                    f"{name} {filters[name]!r} is not a date and time (YYYY-MM-DDTHH:MM)"
                ) from None
            options[name] = value if value.tzinfo else value.replace(tzinfo=UTC)
    return options


async def serve(settings: DashboardSettings, address: str | None = None) -> tuple[Dashboard, int]:
    """Start a dashboard; returns it (stop it with :meth:`Dashboard.stop`) and its port."""
    dashboard = Dashboard(settings)
    port = await dashboard.start(address)
    return dashboard, port


async def _serve() -> None:
    settings = DashboardSettings.from_env()
    dashboard, port = await serve(settings)
    host = settings.listen.rsplit(":", 1)[0]
    scheme = "https" if settings.tls.serves_tls else "http"
    log.info("dashboard at %s://%s:%d (API %s)", scheme, host, port, settings.api_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("dashboard stopping")
    await dashboard.stop()


def main() -> None:
    """Run the dashboard from ``RUNPLANE_*`` settings until SIGTERM or SIGINT."""
    configure_logging()
    run_async(_serve())
