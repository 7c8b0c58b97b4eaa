"""DESIGN rule 1: `proxy/core` decides, `proxy/runtime` moves bytes. Nothing under core imports an
I/O framework, and no core module opens files or sockets or reads the clock."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "proxy" / "core"
FORBIDDEN_MODULES = {"asyncio", "aiohttp", "uvloop", "prometheus_client", "socket", "ssl",
                     "threading", "subprocess", "selectors", "httptools", "proxy.runtime"}
FORBIDDEN_CALLS = {("time", "time"), ("time", "monotonic"), ("time", "perf_counter"),
                   ("os", "urandom"), ("datetime", "now"), ("datetime", "utcnow")}
FORBIDDEN_NAMES = {"open"}

CORE_FILES = sorted(CORE.rglob("*.py"))


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, node.lineno


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_does_no_io(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for mod, line in _imports(tree):
        root = mod.split(".")[0]
        assert root not in FORBIDDEN_MODULES and not mod.startswith("proxy.runtime"), \
            f"{path.name}:{line} imports {mod}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in FORBIDDEN_NAMES:
                pytest.fail(f"{path.name}:{node.lineno} calls {f.id}()")
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                    and (f.value.id, f.attr) in FORBIDDEN_CALLS:
                pytest.fail(f"{path.name}:{node.lineno} calls {f.value.id}.{f.attr}()")


def test_the_rule_is_checked_on_real_files():
    names = {p.name for p in CORE_FILES}
    assert {"pipeline.py", "spiffe.py", "audit.py", "paths.py"} <= names


def test_errors_become_responses_in_one_place():
    """Only runtime/responses.py writes an error status line or error body (DESIGN rule 4)."""
    import re

    root = CORE.parent
    pattern = re.compile(r"HTTP/1\.1 [45]\d\d|[\"']error[\"']\s*:")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "responses.py" and pattern.search(p.read_text())]
    assert offenders == []
