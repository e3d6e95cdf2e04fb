"""The plugin's own hooks, in the pytest-benchmark style: a firstresult "generate" then an in-place "modify"."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.hookspec(firstresult=True)
def pytest_ryzen_generate_report(config: pytest.Config, name: str, data: dict[str, Any]) -> dict[str, Any] | None:
    """Build the report called ``name`` (e.g. ``"validation_report"``) from the session's ``data``.

    The first implementation to return a dict wins; the plugin's own implementation runs last. Return ``None`` to
    let the next implementation (ultimately the default) build it.
    """


@pytest.hookspec
def pytest_ryzen_modify_report(config: pytest.Config, name: str, report: dict[str, Any]) -> None:
    """Change a built report in place before it is written (add fields, redact paths, ...)."""


@pytest.hookspec
def pytest_ryzen_report_parts(config: pytest.Config) -> list[str] | None:
    """The parts (the ``optimizer=`` groups of recorded measurements) the final report needs measured, every gate
    passing, before it says COMPLETE. Every implementation's list counts, with the ``ryzen_parts`` ini lines. Without
    any, the final report covers the groups its gates named."""
