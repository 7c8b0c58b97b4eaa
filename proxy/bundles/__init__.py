"""Policy bundles on disk: `io` reads and writes bundle directories and tar.gz files (with limits,
refusing unsafe members) and keeps the sidecar's last-good copy; `cli` is `portcullis bundle`.
The format and the trust rules are `proxy.core.bundle` (pure)."""
