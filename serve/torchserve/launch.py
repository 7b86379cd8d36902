"""How TorchServe 0.12 is launched here: the launcher command and what its workers run as ``python``.

TorchServe's launcher (``ts.model_server``) hands its own ``sys.executable`` to the Java frontend as the
``python`` every backend worker runs; :func:`torchserve_command` replaces it with ``worker_python``, which
has the worker forked by the fork server (``SERVE_FORKSERVER``) or started plainly through run_worker.py,
both with the worker patches (serve/torchserve/worker.py). serve/server.py (host and container) uses these.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORKSERVER = HERE / "forkserver.py"
WORKER_PYTHON = HERE / "worker_python"  # the workers' "python"
FORKSERVER_SOCKET = ".ts.fork.sock"  # in $TMPDIR (no longer than the workers' .ts.sock.<port>)
FORK_SWITCH = "SERVE_FORK_WORKERS"  # "0": no fork server, every worker a plain process (still patched)


def torchserve_command(worker_python: Path | None = WORKER_PYTHON) -> list[str]:
    """The launcher with ``worker_python`` as the workers' ``python``; None: the plain ``torchserve``
    launcher (its module if the console script is missing), e.g. for ``--stop``."""
    if worker_python is not None:
        launch = "import sys; sys.executable = sys.argv.pop(1); from ts.model_server import start; start()"
        return [sys.executable, "-c", launch, str(worker_python)]
    script = Path(sys.executable).parent / "torchserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ts.model_server"]


def forkserver_command(socket: Path) -> list[str]:
    """The fork server listening at ``socket`` (-P: no script folder on sys.path; each child sets its own)."""
    return [sys.executable, "-P", str(FORKSERVER), "--serve", str(socket)]


def worker_environment(forkserver_socket: Path | None) -> dict[str, str]:
    """What ``worker_python`` reads: the real interpreter, and the fork server's socket (None: none)."""
    env = {"SERVE_WORKER_PYTHON": sys.executable}
    if forkserver_socket is not None:
        env["SERVE_FORKSERVER"] = str(forkserver_socket)
    return env
