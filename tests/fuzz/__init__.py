"""Property tests (hypothesis) for every parser the sidecar owns: bounded examples, a few seconds
each, run by `make test`. The long-running coverage-guided harnesses for the same parsers are in
the top-level `fuzz/` directory (atheris; `make fuzz`, `make fuzz-short`)."""
