"""The ``copiamail web`` server, on aiohttp: a small, maintained asyncio HTTP
stack, so the node's own asyncio habits carry over and nothing here parses
HTTP by hand.

Routes: ``/`` the page and ``/page.js`` its script (:mod:`.page`),
``/api/status`` the status document (:mod:`copiamail.report`) with the
throughput of the last minutes, ``/metrics`` (:mod:`.metrics`).

The document is read from the spool in a thread when clients ask, at most
once a second however many ask (they share the read). The nodes' counters
alone (their state files, not the job files) are sampled every
:data:`SAMPLE_INTERVAL` seconds for the throughput history, which lives in
this process only: a restarted ``web`` starts its chart afresh.

With a token, every request must carry ``Authorization: Bearer TOKEN``
(compared in constant time), else 401. Without one, the server listens only
on loopback (:func:`check_listen`)."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from copiamail.config import Config
from copiamail.config_checks import is_loopback, parse_listen
from copiamail.errors import ConfigError
from copiamail.report import nodes_of, status_document
from copiamail.spool.livestate import read_states
from copiamail.spool.queue import Spool
from copiamail.web.metrics import metrics_registry
from copiamail.web.page import PAGE_HTML, PAGE_JS, SECURITY_HEADERS

SAMPLE_INTERVAL = 2.0  # seconds between two points of the throughput chart
HISTORY_SECONDS = 15 * 60  # how far back the chart goes
FRESH_FOR = 1.0  # a document younger than this is served again rather than read again


class Throughput:
    """Messages per second, from the nodes' counters sampled over time. A
    counter that went down (its node restarted) counts from zero again."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, dict[str, tuple[int, int]]]] = deque(
            maxlen=int(HISTORY_SECONDS / SAMPLE_INTERVAL) + 1)
        self.points: deque[dict[str, float]] = deque(maxlen=int(HISTORY_SECONDS / SAMPLE_INTERVAL))
        self.per_node: dict[str, float] = {}

    def record(self, doc: dict[str, Any]) -> None:
        now = float(doc["time"])
        counts = {n["name"]: (int(n["counters"].get("sent", 0)), int(n["counters"].get("failed", 0)))
                  for n in doc["nodes"] if n["alive"]}
        if self._samples:
            then, before = self._samples[-1]
            span = now - then
            if span <= 0:
                return
            sent = failed = 0
            self.per_node = {}
            for node, (s, f) in counts.items():
                s0, f0 = before.get(node, (0, 0))
                ds, df = (s - s0 if s >= s0 else s), (f - f0 if f >= f0 else f)
                sent, failed = sent + ds, failed + df
                self.per_node[node] = round(ds / span, 2)
            self.points.append({"t": now, "sent_per_second": round(sent / span, 2),
                                "failed_per_second": round(failed / span, 2)})
        self._samples.append((now, counts))


class StatusSource:
    """The spool's status document, shared between requests and sampled for the chart."""

    def __init__(self, spool: Spool, clock: Callable[[], float] = time.time, config: Config | None = None) -> None:
        self._spool = spool
        self._config = config  # for its cluster: leases read from Redis
        self._clock = clock
        self._doc: dict[str, Any] | None = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()
        self.throughput = Throughput()

    async def document(self) -> dict[str, Any]:
        async with self._lock:
            if self._doc is None or time.monotonic() - self._read_at >= FRESH_FOR:
                self._doc = await asyncio.to_thread(status_document, self._spool, self._clock(), self._config)
                self._read_at = time.monotonic()
            return self._doc

    async def sample(self) -> None:
        """Sample the nodes' counters until cancelled (their state files
        only: the job files are read when a client asks, not for the chart)."""
        while True:
            now = self._clock()
            states = await asyncio.to_thread(read_states, self._spool.root, now)
            self.throughput.record({"time": now, "nodes": nodes_of(states, now)})
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def api_document(self) -> dict[str, Any]:
        """The document, with ``throughput`` (the chart's points) and each
        live node's ``sent_per_second``."""
        doc = dict(await self.document())
        doc["nodes"] = [{**n, "sent_per_second": self.throughput.per_node.get(n["name"], 0.0)} for n in doc["nodes"]]
        doc["throughput"] = list(self.throughput.points)
        return doc


def read_token(path: Path | None) -> str | None:
    """The bearer token in ``path`` (its text without surrounding white
    space); ConfigError in one line if it cannot be read or is empty."""
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"web.token_file: {path}: {getattr(e, 'strerror', None) or e}") from None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"web.token_file: {path}: the token must be one word, not empty")
    return token


def check_listen(listen: str, token: str | None) -> tuple[str, int]:
    """Where to listen; ConfigError unless the address is loopback or a token is set."""
    try:
        host, port = parse_listen(listen)
    except ValueError as e:
        raise ConfigError(f"web.listen: {e}") from None
    if token is None and not is_loopback(host):
        raise ConfigError(f"web.listen: {listen} is not a loopback address; set web.token_file "
                          "(every request must then carry its token) to listen there")
    return host, port


def _authorized(token: str | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode() if token is not None else b""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if token is not None:
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):
                return web.Response(status=401, text="401: a bearer token is required\n",
                                    headers={"WWW-Authenticate": 'Bearer realm="copiamail"', **SECURITY_HEADERS})
        return await handler(request)
    return middleware


def make_app(spool: Spool, token: str | None = None, clock: Callable[[], float] = time.time,
             config: Config | None = None) -> web.Application:
    """The application: routes, the token check, and the sampling task for
    its lifetime; ``config``: whose cluster's leases the status shows."""
    source = StatusSource(spool, clock, config)

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE_HTML, content_type="text/html", headers=SECURITY_HEADERS)

    async def script(request: web.Request) -> web.Response:
        return web.Response(text=PAGE_JS, content_type="text/javascript", headers=SECURITY_HEADERS)

    async def api_status(request: web.Request) -> web.Response:
        return web.json_response(await source.api_document(), headers={"Cache-Control": "no-store", **SECURITY_HEADERS})

    async def metrics(request: web.Request) -> web.Response:
        doc = await source.document()
        body = generate_latest(metrics_registry(lambda: doc))  # made from the document: no I/O
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, **SECURITY_HEADERS})

    async def sampling(app: web.Application) -> Any:
        task = asyncio.get_running_loop().create_task(source.sample())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    app = web.Application(middlewares=[_authorized(token)])
    app.router.add_get("/", page)
    app.router.add_get("/page.js", script)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(sampling)
    return app
