"""Benchmarks run only when asked for: `make bench` (pytest ... -m bench).

A plain `pytest` (make test) collects tests/benchmarks too, because testpaths is
["tests"]; every test marked ``bench`` is skipped there unless the ``-m`` expression
selects the bench marker (``-m bench``, ``-m "bench and not slow"``, ...).
"""

from __future__ import annotations

import re

import pytest

_SELECTS_BENCH = re.compile(r"(?<!not )\bbench\b")


def bench_requested(config: pytest.Config) -> bool:
    """True when ``-m`` names the bench marker other than as ``not bench``."""
    return bool(_SELECTS_BENCH.search(config.getoption("-m") or ""))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if bench_requested(config):
        return
    skip = pytest.mark.skip(reason="benchmark: run it with `make bench` (pytest -m bench)")
    for item in items:
        if item.get_closest_marker("bench") is not None:
            item.add_marker(skip)
