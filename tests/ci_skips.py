"""Under CI no test may pass by skipping: a skip that is not on the allowlist below fails the run.

``CI`` set to a true value (``true``, ``1``, ``yes``, ``on``; ``.ci/run`` exports ``CI=true``) switches the
policy on. Every skip, of a test or of a whole module at collection, is then checked against
:data:`ALLOWED_SKIPS`; any other skip is listed, with its reason, under "unexpected skips under CI" and the
session exits non-zero. Without ``CI`` skips are reported as pytest always reports them (``-ra``).
tests/conftest.py registers :class:`SkipPolicy` with this allowlist; tests/test_conftest_skips.py runs real
pytest sessions of tiny test files through it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fnmatch import fnmatchcase

import pytest


@dataclass(frozen=True)
class AllowedSkip:
    """A skip CI may see: tests whose node id matches ``nodeid`` (fnmatch pattern), skipped with a reason
    containing ``reason``; ``why`` says in one line why that skip cannot hide a failure."""

    nodeid: str
    reason: str
    why: str


# The one allowlist: each entry names the test(s), the skip reason they must give, and why CI may skip them.
# Empty today: every skip left in the suite is one CI must never see (no Java or JDK tools, no container
# engine: CI installs them; tests/container fails under CI rather than skips), so under CI each is a failure.
# An entry looks like: AllowedSkip("tests/gpu/test_x.py::test_on_gpu*", "no GPU", "GPU-only; CI has no GPU").
ALLOWED_SKIPS: tuple[AllowedSkip, ...] = ()

TRUE_VALUES = ("1", "true", "yes", "on")


def ci_enabled(environ=None) -> bool:
    """True when ``CI`` is set to a true value (case-insensitive)."""
    return (os.environ if environ is None else environ).get("CI", "").strip().lower() in TRUE_VALUES


def skip_reason(report) -> str:
    """The reason pytest records for a skipped report (``longrepr`` is ``(path, line, "Skipped: why")``)."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    return reason.removeprefix("Skipped: ")


class SkipPolicy:
    """A pytest plugin: records every skip; with ``enabled`` (CI), fails the session on each skip that
    no entry of ``allowed`` covers, naming it and its reason in the terminal summary."""

    def __init__(self, allowed=ALLOWED_SKIPS, enabled: bool | None = None):
        self.allowed = tuple(allowed)
        self.enabled = ci_enabled() if enabled is None else enabled
        self.unexpected: list[tuple[str, str]] = []
        self.allowed_seen: list[tuple[str, str, AllowedSkip]] = []

    def entry_for(self, nodeid: str, reason: str) -> AllowedSkip | None:
        for entry in self.allowed:
            if fnmatchcase(nodeid, entry.nodeid) and entry.reason in reason:
                return entry
        return None

    def _record(self, report) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):  # xfail/xpass reports are not skips
            return
        reason = skip_reason(report)
        entry = self.entry_for(report.nodeid, reason)
        if entry is None:
            self.unexpected.append((report.nodeid, reason))
        else:
            self.allowed_seen.append((report.nodeid, reason, entry))

    def pytest_collectreport(self, report) -> None:
        self._record(report)  # a module skipped whole (pytest.skip(allow_module_level=True), importorskip)

    def pytest_runtest_logreport(self, report) -> None:
        self._record(report)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.enabled:
            return
        if self.allowed_seen:
            terminalreporter.section("skips allowed under CI (tests/ci_skips.py)", sep="-")
            for nodeid, reason, entry in self.allowed_seen:
                terminalreporter.line(f"{nodeid}: {reason} -- allowed: {entry.why}")
        if self.unexpected:
            terminalreporter.section("unexpected skips under CI", sep="=", red=True, bold=True)
            for nodeid, reason in self.unexpected:
                terminalreporter.line(f"UNEXPECTED SKIP {nodeid}: {reason}", red=True)
            terminalreporter.line(
                f"CI: {len(self.unexpected)} skip(s) not on the allowlist in tests/ci_skips.py fail this run; "
                "make the test run, or add an entry with its reason if the skip cannot hide a failure", red=True)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session) -> None:
        if self.enabled and self.unexpected and session.exitstatus in (pytest.ExitCode.OK,
                                                                         pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
