"""The CI skip policy (tests/ci_skips.py, registered by tests/conftest.py) and the cleared environment, in real
pytest runs of tiny test files (pytest's ``pytester``): under ``CI`` a skip not on the allowlist fails the run
and is named with its reason; an allowlisted one passes; without ``CI`` skips are allowed."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ci_skips import ALLOWED_SKIPS, ci_enabled
from servers import clean_env, inherited_variable

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

TINY = """
import pytest

def test_passes():
    assert 1 + 1 == 2

def test_skipped():
    pytest.skip("no reason to skip here")
"""

# A conftest registering the real policy with an allowlist of its own (the real one names the real tests).
POLICY_CONFTEST = """
from ci_skips import AllowedSkip, SkipPolicy

def pytest_configure(config):
    config.pluginmanager.register(SkipPolicy([
        AllowedSkip("test_tiny.py::test_skipped", "no reason to skip", "a test of the policy"),
        AllowedSkip("test_gpu.py::test_on_gpu*", "no GPU here", "GPU-only case"),
    ]), "ci-skip-policy")
"""


@pytest.fixture
def run(pytester, monkeypatch):
    """``run(ci, *args)``: a real pytest session in ``pytester``'s folder with ``CI`` set to ``ci`` (None:
    unset; the outer run may itself be under CI)."""
    def session(ci: str | None, *args: str, subprocess: bool = False):
        if ci is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", ci)
        runner = pytester.runpytest_subprocess if subprocess else pytester.runpytest
        return runner("-p", "no:randomly", "-p", "no:cacheprovider", "-rs", *args)

    return session


@pytest.mark.parametrize("value, enabled", [("true", True), ("TRUE", True), ("1", True), ("yes", True),
                                            ("on", True), ("false", False), ("0", False), ("", False),
                                            (None, False)])
def test_ci_is_a_true_value_of_the_variable(value, enabled):
    assert ci_enabled({} if value is None else {"CI": value}) is enabled


def test_under_ci_an_unexpected_skip_fails_the_run_and_is_named(pytester, run):
    pytester.makeconftest(POLICY_CONFTEST)
    pytester.makepyfile(test_other=TINY)
    result = run("true")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*unexpected skips under CI*",
                                 "UNEXPECTED SKIP test_other.py::test_skipped: no reason to skip here",
                                 "CI: 1 skip(s) not on the allowlist in tests/ci_skips.py fail this run*"])


def test_under_ci_an_allowlisted_skip_passes(pytester, run):
    pytester.makeconftest(POLICY_CONFTEST)
    pytester.makepyfile(test_tiny=TINY)
    result = run("true")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*skips allowed under CI*",
                                 "test_tiny.py::test_skipped: no reason to skip here -- allowed: a test of the policy"])
    result.stdout.no_fnmatch_line("*UNEXPECTED SKIP*")


def test_an_allowlisted_test_skipped_for_another_reason_fails(pytester, run):
    pytester.makeconftest(POLICY_CONFTEST)
    pytester.makepyfile(test_gpu="""
        import pytest

        @pytest.mark.parametrize("n", [1, 2])
        def test_on_gpu(n):
            pytest.skip("no GPU here" if n == 1 else "the driver is too old")
    """)
    result = run("1")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["UNEXPECTED SKIP test_gpu.py::test_on_gpu?2?: the driver is too old"])
    result.stdout.no_fnmatch_line("UNEXPECTED SKIP test_gpu.py::test_on_gpu?1?*")


@pytest.mark.parametrize("ci", [None, "false", "0"])
def test_without_ci_skips_are_allowed(pytester, run, ci):
    pytester.makeconftest(POLICY_CONFTEST)
    pytester.makepyfile(test_other=TINY)
    result = run(ci)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_other.py:*: no reason to skip here"])
    result.stdout.no_fnmatch_line("*UNEXPECTED SKIP*")


def test_under_ci_skip_markers_and_a_module_skipped_at_import_fail(pytester, run):
    """importorskip of a module that is not there skips the whole module at collection: CI names it."""
    pytester.makeconftest(POLICY_CONFTEST)
    pytester.makepyfile(
        test_missing="""
            import pytest
            pytest.importorskip("no_such_module_for_this_test")

            def test_never_runs():
                pass
        """,
        test_marked="""
            import sys
            import pytest

            @pytest.mark.skipif(sys.version_info > (3,), reason="marked to skip")
            def test_marked():
                pass

            @pytest.mark.xfail(reason="an expected failure is not a skip", strict=True)
            def test_xfail():
                assert False
        """,
    )
    result = run("true")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(skipped=2, xfailed=1)
    result.stdout.fnmatch_lines_random([
        "UNEXPECTED SKIP test_missing.py: could not import 'no_such_module_for_this_test'*",
        "UNEXPECTED SKIP test_marked.py::test_marked: marked to skip",
        "CI: 2 skip(s) not on the allowlist*"])
    result.stdout.no_fnmatch_line("*test_xfail*UNEXPECTED*")


def test_under_ci_a_failing_run_keeps_its_exit_status(pytester, run):
    pytester.makeconftest(POLICY_CONFTEST)
    pytester.makepyfile(test_other=TINY + "\ndef test_fails():\n    assert 0\n")
    result = run("true")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["UNEXPECTED SKIP test_other.py::test_skipped: no reason to skip here"])


def test_the_real_conftest_and_allowlist(pytester, run):
    """The repository's own tests/conftest.py and tests/ci_skips.py, copied beside tiny tests laid out like
    the real ones: each allowlisted test id skipped with its stated reason passes, any other skip fails, and the
    inherited PYTHONPATH is gone before the first test."""
    tests = pytester.mkdir("tests")
    for name in ("conftest.py", "ci_skips.py", "servers.py"):
        shutil.copy2(TESTS / name, tests / name)
    pytester.makeini("[pytest]\n")
    for entry in ALLOWED_SKIPS:  # each names a real test that skips with that reason, said in one line
        path, _, name = entry.nodeid.partition("::")
        source = (REPO / path).read_text()
        assert name.split("[")[0] in {node.name for node in ast.walk(ast.parse(source))
                                      if isinstance(node, ast.FunctionDef)}, entry
        assert entry.reason in source and entry.why and "\n" not in entry.why, entry
        target = pytester.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        base = name.split("[")[0]
        target.write_text(f"import pytest\n\ndef {base}():\n    pytest.skip({entry.reason + ': here'!r})\n")
    (tests / "test_unlisted.py").write_text(TINY)
    # pytester starts the session with PYTHONPATH set (its folder): the real conftest clears it before any test.
    (tests / "test_environment.py").write_text("import os\n\ndef test_cleared():\n"
                                               "    assert 'PYTHONPATH' not in os.environ\n")
    result = run("true", "tests", subprocess=True)  # its own process: the tiny modules shadow the real ones
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=2, skipped=1 + len(ALLOWED_SKIPS))
    unexpected = [line for line in result.outlines if line.startswith("UNEXPECTED SKIP")]
    assert unexpected == ["UNEXPECTED SKIP tests/test_unlisted.py::test_skipped: no reason to skip here"]


# ------------------------------------------------------------------------------ the cleared environment


def test_inherited_variables_are_the_behaviour_changing_ones():
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONWARNINGS", "TS_CONFIG_FILE",
                 "TS_INFERENCE_KEY", "SERVE_FORK_WORKERS", "SERVE_FAST_WORKER", "OIP_AGENT_JAR",
                 "JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "PYTEST_ADDOPTS"):
        assert inherited_variable(name), name
    for name in ("PATH", "HOME", "CI", "TMPDIR", "JAVA_HOME", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
                 "PYTHONUNBUFFERED", "LANG"):
        assert not inherited_variable(name), name


def test_the_session_cleared_what_it_inherited_and_subprocesses_get_none(monkeypatch):
    assert not [name for name in os.environ if inherited_variable(name)], "tests/conftest.py clears them"
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")
    monkeypatch.setenv("TS_CONFIG_FILE", "/elsewhere/config.properties")
    env = clean_env(TS_WORKDIR="/w", EXTRA="1")
    assert "PYTHONPATH" not in env and "TS_CONFIG_FILE" not in env
    assert env["TS_WORKDIR"] == "/w" and env["EXTRA"] == "1" and env["PATH"] == os.environ["PATH"]
    shown = subprocess.run([sys.executable, "-c", "import os, sys; print(os.environ.get('PYTHONPATH'), '/nonexistent' in sys.path)"],
                           env=env, capture_output=True, text=True, timeout=60, check=True)
    assert shown.stdout.split() == ["None", "False"]
