"""The control plane's HTTP API (aiohttp, mTLS): bundle server, publishing, revocations, fleet.

Every request, in this order (one middleware, so no handler can be reached another way):
1. The TLS handshake already required a client certificate chaining to one of the configured
   trust bundles (OpenSSL, a coarse gate: no certificate / an unknown CA never gets here).
2-4. `core.pipeline.authorize`, the sidecar's one check order, with the control plane's trust
   bundles and its own policy (no token issuers): the presented chain is verified as an
   X.509-SVID against the bundle of the leaf's OWN trust domain              else 403 svid_*;
   the request target is canonicalised                                  else 400 invalid_*;
   the policy decides on the verified SPIFFE ID, method and canonical path
                                                 else 403 no_matching_rule / denied_by_rule.
   Then the router must see the same path as the decision did         else 400 invalid_path.
5. The handler. Its failures are `ProxyError`s (or the router's 404/405, mapped to ours).
6. One JSON audit line on stdout for every management request and every refused request; allowed
   bundle fetches and status reports (the fleet's steady traffic) only with
   `audit.sidecar_requests`.

Endpoints:
  GET  /bundles/{name}                    the current revision, tar.gz, ETag = "<manifest digest>";
                                          If-None-Match -> 304; `Prefer: wait=N` (capped) holds a
                                          matching request until a new revision (200) or N s (304)
  GET  /v1/bundles                        bundle names and current revisions
  GET  /v1/bundles/{name}                 current revision and the retained revisions
  POST /v1/bundles/{name}/publish         body: tar.gz of a source directory -> 201 new revision;
                                          400 bundle_invalid with every problem
  POST /v1/bundles/{name}/rollback        {"to_revision": N} -> 201: N's content as a NEW revision
  POST /v1/bundles/{name}/revocations     add revocations -> 201 new revision (200 if no change)
  DELETE /v1/bundles/{name}/revocations   remove revocations (same body shape)
  POST /v1/status                         a sidecar's status report (identified by its SVID)
  GET  /v1/fleet                          every sidecar's last report, its age, stale/behind flags
  GET  /v1/signing-key                    the bundle signing public key (kid, alg, PEM)

Error bodies are rendered by `proxy.runtime.responses.render_error` (the single mapping from a
`ProxyError` to a body: a JSON object holding the stable code under `error` and the request id as
`decision_id`), extended with `problems` ([{file?, path, message}]) where a request had several.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import orjson
from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from proxy.controlplane import revocations as rv
from proxy.controlplane.config import valid_bundle_name
from proxy.controlplane.fleet import StatusReport
from proxy.controlplane.store import PublishRejected, RevisionNotFound, read_source_targz
from proxy.core import bundle as cb
from proxy.core.pipeline import RequestFacts, State, authorize, deny_error
from proxy.core.schema import build, meta
from proxy.core.spiffe import PeerCertificates
from proxy.errors import (BadRequest, BundleError, ConfigError, InternalError,
                          InvalidInput, MethodNotAllowed, NotFound, PayloadTooLarge, ProxyError)
from proxy.runtime.responses import render_error
from proxy.runtime.tls import peer_chain_der

if TYPE_CHECKING:
    from proxy.controlplane.server import ControlPlane

log = logging.getLogger("portcullis.controlplane")

# Per-request storage keys (web.RequestKey where aiohttp has it, 3.12+).
_Key = getattr(web, "RequestKey", None)
PEER: Any = _Key("portcullis_peer", object) if _Key else "portcullis_peer"
AUDIT: Any = _Key("portcullis_audit", dict) if _Key else "portcullis_audit"

GZIP = "application/gzip"
OPA_LONG_POLL = "application/vnd.openpolicyagent.bundles"


@dataclass(frozen=True, slots=True)
class RollbackRequest:
    to_revision: int = field(metadata=meta(min=1, doc="the revision whose content to republish"))


# --------------------------------------------------------------------------------------------
# Small protocol helpers (pure)
# --------------------------------------------------------------------------------------------


def parse_prefer_wait(values: list[str]) -> float:
    """The `wait` preference of RFC 7240 `Prefer` headers, in seconds (0 when absent/invalid)."""
    for value in values:
        for pref in value.split(","):
            head = pref.split(";", 1)[0].strip()
            name, sep, arg = head.partition("=")
            if name.strip().lower() != "wait" or not sep:
                continue
            arg = arg.strip().strip('"')
            if arg.isdigit() and len(arg) <= 9:
                return float(int(arg))
            return 0.0
    return 0.0


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 13.1.2 weak comparison of `If-None-Match` against our (strong) ETag."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag or f'"{tag}"' == etag:  # tolerate clients that drop the quotes
            return True
    return False


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def error_response(err: ProxyError, request_id: str) -> web.Response:
    """The one place this API turns a ProxyError into a response (body from `render_error`)."""
    raw = render_error(err, decision_id=request_id, close=False)
    body = raw.partition(b"\r\n\r\n")[2]
    problems = getattr(err, "problems", None)
    if problems:
        doc = orjson.loads(body)
        doc["problems"] = problems
        body = orjson.dumps(doc)
    headers = {"Cache-Control": "no-store"}
    challenge = err.challenge()
    if challenge is not None:
        headers["WWW-Authenticate"] = challenge
    for name, value in err.extra_headers:
        headers[name] = value
    return web.Response(status=err.status, body=body, content_type="application/json",
                        headers=headers)


def _from_http_exception(exc: web.HTTPException) -> ProxyError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("not_found")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed()
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge()
    if 400 <= exc.status < 500:
        return BadRequest("bad_request", f"HTTP {exc.status} from the framework")
    return InternalError("internal_error", f"HTTP {exc.status} from the framework")


async def _json_body(request: web.Request) -> Any:
    data = await request.read()
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidInput("invalid_json", [{"path": "", "message": "body is not valid JSON"}]) \
            from None


def _build_body(cls: type, doc: Any) -> Any:
    try:
        return build(cls, doc)
    except ConfigError as exc:
        raise InvalidInput("invalid_request",
                           [{"path": p.path, "message": p.message} for p in exc.problems]) from None


# --------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------


def make_app(cp: ControlPlane) -> web.Application:
    cfg = cp.cfg
    store = cp.store
    long_poll_cap = cfg.long_poll.max_wait_s
    bundle_type = OPA_LONG_POLL if cfg.long_poll.advertise_opa_long_polling else GZIP

    @web.middleware
    async def gate(request: web.Request, handler: Callable) -> web.StreamResponse:
        loop_time = asyncio.get_running_loop().time
        t0 = loop_time()
        now = cp.clock()
        policy = cp.policy  # one snapshot per request, also for the audit line
        rid = secrets.token_hex(8)
        audit: dict[str, Any] = {}
        request[AUDIT] = audit
        peer = None
        rule_id = None
        try:
            transport = request.transport
            facts = RequestFacts(request.method, request.raw_path, PeerCertificates(
                peer_chain_der(transport) if transport is not None else ()))
            state = State(trust=cp.trust, policy=policy, mode="enforce",
                          own_id=str(cp.svid_input.value.spiffe_id))
            try:  # the sidecar's check order (core.pipeline): SVID, target, policy
                decision = authorize(facts, state, now)
            finally:
                peer = facts.peer.identity  # None when the caller's SVID did not verify
                request[PEER] = peer
            if decision.target.path != request.path:
                raise BadRequest("invalid_path", "the router would read the path differently")
            rule_id = decision.rule_id
            if not decision.allowed:
                raise deny_error(decision)
            try:
                resp = await handler(request)
            except web.HTTPException as exc:
                raise _from_http_exception(exc) from None
            decision, code, status = "allow", "ok", resp.status
        except ProxyError as err:
            resp = error_response(err, rid)
            decision, code, status = err.decision, err.code, err.status
            if err.detail:
                audit["detail"] = err.detail[:500]
        except Exception:  # a bug: never a traceback to the client
            log.exception("request %s failed", rid)
            err = InternalError()
            resp = error_response(err, rid)
            decision, code, status = err.decision, err.code, err.status
        resp.headers["x-request-id"] = rid
        path = request.path
        if decision != "allow" or cfg.audit.sidecar_requests or not (
                path.startswith("/bundles/") or path == "/v1/status"):
            cp.audit({
                "type": "controlplane_request", "time": now, "request_id": rid,
                "peer": peer.uri if peer else None,
                "peer_cert_sha256": peer.cert_sha256_hex if peer else None,
                "method": request.method, "path": path[:512], "status": status,
                "decision": decision, "code": code, "rule_id": rule_id,
                "policy_revision": policy.revision,
                "duration_s": round(loop_time() - t0, 6), **audit,
            })
        return resp

    def slot_of(request: web.Request):
        name = request.match_info["name"]
        slot = store.slot(name) if valid_bundle_name(name) else None
        if slot is None:
            raise NotFound("bundle_not_found", f"no bundle named {name!r} is served")
        request[AUDIT]["bundle"] = name
        return slot

    # -- bundle server ---------------------------------------------------------------------

    async def get_bundle(request: web.Request) -> web.StreamResponse:
        slot = slot_of(request)
        wait = min(parse_prefer_wait(request.headers.getall("Prefer", [])), long_poll_cap)
        inm = request.headers.get("If-None-Match")
        cur = slot.current
        applied = False
        if wait > 0 and (cur is None or etag_matches(inm, cur.etag)):
            applied = True
            await store.wait_change(slot, cur, wait)
            cur = slot.current
        if cur is None:
            raise NotFound("bundle_not_published", "the bundle has no revision yet")
        request[AUDIT]["revision"] = cur.revision
        headers = {"ETag": cur.etag, "Cache-Control": "no-cache",
                   "X-Bundle-Revision": str(cur.revision)}
        if applied:
            headers["Preference-Applied"] = f"wait={int(wait)}"
        if etag_matches(inm, cur.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=cur.targz, content_type=bundle_type, headers=headers)

    # -- admin ---------------------------------------------------------------------------

    def revision_json(rev) -> dict[str, Any]:
        return {"bundle": rev.bundle, **rev.meta(), "etag": rev.etag}

    async def list_bundles(_request: web.Request) -> web.Response:
        return _json({"bundles": [{"name": n, "current_revision": store.current_revision(n)}
                                  for n in sorted(store.slots)]})

    async def get_listing(request: web.Request) -> web.Response:
        slot = slot_of(request)
        return _json(store.listing(slot.name))

    async def publish(request: web.Request) -> web.Response:
        slot = slot_of(request)
        body = await request.read()
        skipped: list[str] = []
        try:
            files = read_source_targz(body, store.limits, skipped)
        except BundleError as exc:
            if exc.code == "bundle_too_large":
                raise PayloadTooLarge("upload_too_large", exc.detail) from None
            raise InvalidInput("upload_invalid", [{"path": "", "message": exc.detail}]) from None
        try:
            rev = await store.publish(slot.name, files, origin="publish", by=request[PEER].uri)
        except PublishRejected as exc:
            raise InvalidInput(exc.code, exc.problems) from None
        request[AUDIT]["revision"] = rev.revision
        return _json({**revision_json(rev), "skipped": skipped}, status=201)

    async def rollback(request: web.Request) -> web.Response:
        slot = slot_of(request)
        req = _build_body(RollbackRequest, await _json_body(request))
        try:
            rev = await store.rollback(slot.name, req.to_revision, by=request[PEER].uri)
        except RevisionNotFound:
            raise NotFound("revision_not_found",
                           f"revision {req.to_revision} is not retained") from None
        except PublishRejected as exc:
            raise InvalidInput(exc.code, exc.problems) from None
        except BundleError as exc:
            raise InternalError("internal_error",
                                f"stored revision {req.to_revision}: {exc}") from None
        request[AUDIT]["revision"] = rev.revision
        request[AUDIT]["from_revision"] = req.to_revision
        return _json(revision_json(rev), status=201)

    async def revocations(request: web.Request) -> web.Response:
        slot = slot_of(request)
        add = request.method == "POST"
        change, problems = rv.parse(await _json_body(request), require_entry=True,
                                    max_entries=cfg.limits.max_revocation_entries)
        if problems:
            raise InvalidInput("invalid_request",
                               [{"path": p.path, "message": p.message} for p in problems])
        try:
            rev, changed = await store.change_revocations(slot.name, change, add=add,
                                                          by=request[PEER].uri)
        except RevisionNotFound:
            raise NotFound("bundle_not_published", "the bundle has no revision yet") from None
        except PublishRejected as exc:
            raise InvalidInput(exc.code, exc.problems) from None
        assert rev is not None
        request[AUDIT]["revision"] = rev.revision
        request[AUDIT]["revocations"] = {k: len(v) for k, v in rv.to_json(change).items() if v}
        data = rev.files.get(cb.REVOCATIONS_NAME)
        now_revoked = cb.EMPTY_REVOCATIONS if data is None else cb.parse_revocations(data)
        return _json({**revision_json(rev), "changed": changed,
                      "revocations": {k: len(v) for k, v in rv.to_json(now_revoked).items()}},
                     status=201 if changed else 200)

    async def status(request: web.Request) -> web.Response:
        report = _build_body(StatusReport, await _json_body(request))
        peer = request[PEER]
        cp.fleet.report(peer.uri, report, cp.clock())
        request[AUDIT]["bundle"] = report.bundle
        return _json({"received": True,
                      "current_revision": store.current_revision(report.bundle)})

    async def fleet(_request: web.Request) -> web.Response:
        return _json(cp.fleet.view(cp.clock(), store.current_revision))

    async def signing_key(_request: web.Request) -> web.Response:
        pem = store.public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        return _json({"kid": store.kid, "alg": cb.alg_for(store.public_key),
                      "public_key_pem": pem.decode("ascii")})

    app = web.Application(middlewares=[gate], client_max_size=cfg.listener.max_upload_bytes)
    app.router.add_get("/bundles/{name}", get_bundle)
    app.router.add_get("/v1/bundles", list_bundles)
    app.router.add_get("/v1/bundles/{name}", get_listing)
    app.router.add_post("/v1/bundles/{name}/publish", publish)
    app.router.add_post("/v1/bundles/{name}/rollback", rollback)
    app.router.add_post("/v1/bundles/{name}/revocations", revocations)
    app.router.add_delete("/v1/bundles/{name}/revocations", revocations)
    app.router.add_post("/v1/status", status)
    app.router.add_get("/v1/fleet", fleet)
    app.router.add_get("/v1/signing-key", signing_key)
    return app
