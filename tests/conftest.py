"""Shared test configuration: hypothesis profiles and pytester."""

from __future__ import annotations

import os

import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401
from hypothesis import HealthCheck, settings

# Preload what the plugin imports lazily. pytester's in-process runs restore sys.modules afterwards, and a C
# extension like torch cannot be imported a second time in one process ("SystemError: bad call flags").
import pytest_ryzen.fixture  # noqa: E402,F401
import ryzen_opt.bench  # noqa: E402,F401
import ryzen_opt.metrics  # noqa: E402,F401
import ryzen_opt.validation  # noqa: E402,F401

pytest_plugins = ["pytester"]

# Tensor code has no meaningful per-example deadline on a shared 2-core machine; CI is derandomized so that a
# failure reproduces from the log alone.
settings.register_profile("dev", deadline=None, max_examples=50)
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=30,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
