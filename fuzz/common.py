"""Shared by the harnesses: the atheris entry point."""

from __future__ import annotations

import sys
from typing import Callable

import atheris


def run(test_one_input: Callable[[bytes], None]) -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
