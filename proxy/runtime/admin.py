"""The admin listener (plain HTTP, aiohttp, off the hot path): /healthz, /readyz, /metrics.

Rules:
- /healthz: 200 while the process serves (liveness; never depends on inputs).
- /readyz: 200 only when the own SVID, every trust bundle and the policy are loaded and fresh, the
  audit sink is healthy and the process is not draining; otherwise 503 with the reasons (stable
  codes such as `svid_expired`, `policy_stale`, `draining`).
- /metrics: Prometheus text exposition (`promtool check metrics` clean).
- Bind it to loopback or a pod-internal address: it is unauthenticated by design, like Envoy's.
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.runtime.metrics import Metrics, make_registry

StatusFn = Callable[[], "dict[str, Any] | Awaitable[dict[str, Any]]"]
ExpositionFn = Callable[[], Awaitable[bytes]]


async def _maybe_await(v: Any) -> Any:
    return await v if inspect.isawaitable(v) else v


def make_app(status: StatusFn, exposition: ExpositionFn) -> web.Application:
    async def healthz(_req: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_req: web.Request) -> web.Response:
        st = await _maybe_await(status())
        return web.json_response(st, status=200 if st.get("ready") else 503)

    async def metrics(_req: web.Request) -> web.Response:
        body = await exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_app(app: web.Application, address: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, address, port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, bound


async def start_admin(address: str, port: int, status: StatusFn,
                      metrics: Metrics) -> tuple[web.AppRunner, int]:
    """Admin listener of a single worker process."""
    registry = make_registry(metrics)

    async def exposition() -> bytes:
        return generate_latest(registry)

    return await start_app(make_app(status, exposition), address, port)
