"""The demo's sample workload: a tiny "orders" HTTP service that shows what the sidecar told it.

Run: python -m proxy.demo.app --port 8080 (plain HTTP on 127.0.0.1; only the sidecar calls it).
"""

from __future__ import annotations

import argparse

from aiohttp import web


async def handle(req: web.Request) -> web.Response:
    body = await req.read()
    return web.json_response({
        "service": "orders",
        "method": req.method,
        "path": req.path_qs,
        "caller": req.headers.get("x-portcullis-spiffe-id"),
        "xfcc": req.headers.get("x-forwarded-client-cert"),
        "request_id": req.headers.get("x-request-id"),
        "body_bytes": len(body),
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
