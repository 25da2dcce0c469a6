"""Shared test fixtures and the CI skip policy.

Skip policy: locally a test whose dependency is missing (``pytest.importorskip``, a missing
shipped model) is skipped, so the suite runs on a partial install. In CI (environment variable
``CI`` set to a true value: ``true``, ``1``, ``yes``) such a skip FAILS instead: CI installs
everything, so a missing dependency there is a packaging error that would otherwise hide tests.
A skip counts as "missing dependency" when its reason matches :data:`MISSING_DEPENDENCY`;
other skips (a test skipped on purpose) and expected failures are left alone.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

#: skip reasons that mean "something that should be installed is not": pytest.importorskip's
#: "could not import 'x'", ImportError texts, and the suite's own "no shipped model ..." skips
MISSING_DEPENDENCY = re.compile(
    r"could not import|no module named|not installed|no shipped|shipped model .* absent", re.IGNORECASE
)


def in_ci() -> bool:
    """True when the environment variable ``CI`` says so (as set by CI services and .ci/run)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_missing_dependency(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if MISSING_DEPENDENCY.search(reason):
        report.outcome = "failed"
        report.longrepr = (f"skipped for a missing dependency, which fails in CI (CI={os.environ.get('CI')!r}): "
                           f"{reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ARG001 - pytest's hook signature
    outcome = yield
    _fail_missing_dependency(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):  # noqa: ARG001 - module-level importorskip skips at collection
    outcome = yield
    _fail_missing_dependency(outcome.get_result())


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny tensors gain nothing from two, and on a shared 2-core
    machine two OpenMP threads fighting for one core are several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
