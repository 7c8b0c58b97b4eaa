# Portcullis: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast venv system-deps bench clean fuzz fuzz-short soak

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests use for real: curl (clients), promtool (metrics exposition check).
system-deps:
	@command -v curl >/dev/null && command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends curl prometheus >/dev/null; }

test: venv system-deps
	$(PY) -m pytest -q -rfE

test-fast: venv
	$(PY) -m pytest -q -x -m 'not slow'

demo: venv system-deps
	$(PY) -m proxy demo

bench: venv
	$(PY) bench/run.py

# Coverage-guided fuzzing (atheris) of every parser the sidecar owns, each harness for a bounded
# time; loopback only. See fuzz/README.md. The hypothesis properties in tests/fuzz run in `make test`.
fuzz: venv
	$(PY) -m pip install -q atheris
	$(PY) fuzz/run.py --seconds 60

fuzz-short: venv
	$(PY) -m pip install -q atheris
	$(PY) fuzz/run.py --seconds 10

# Soak: steady mTLS load while certificates rotate, bundles change and revocations come and go
# (bounded in time and rate, loopback only). SOAK_ARGS e.g. '--duration 600 --rate 300'.
SOAK_ARGS ?= --duration 120 --rate 200
soak: venv system-deps
	$(PY) soak/run.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
