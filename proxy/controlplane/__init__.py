"""The Portcullis control plane: `portcullis control-plane serve --config FILE`.

It serves signed, versioned policy bundles to sidecars over mTLS (OPA bundle HTTP protocol: ETag,
If-None-Match/304, long polling with `Prefer: wait=N`), accepts new revisions, rollbacks and
revocations from deployers, and keeps the fleet's status reports. Every API request is decided by a
Portcullis policy of its own, on the caller's verified SPIFFE ID.

- `config`       the YAML config (frozen dataclasses, every problem with its path)
- `store`        durable, signed, monotonic revisions; validation; long-poll events
- `revocations`  `data/revocations.json` change requests
- `fleet`        sidecar status reports
- `api`          the aiohttp application (one gate middleware: SVID, path, policy, audit)
- `server`       process lifecycle (inputs, TLS, refresh, shutdown)
- `cli`          `register(subparsers)` for the `portcullis` command
"""
