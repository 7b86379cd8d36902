"""Everything that reaches into TorchServe 0.12's internals, in one place (docs/torchserve-patches.md).

* ``agent`` + ``java/``: the Java agent that replaces two frontend classes (the Open Inference Protocol REST
  surface, error bodies) and patches one (requests held for a batch survive a dead worker);
* ``worker``: the leaner worker loop (``retrieve_msg``, ``Service.predict``), installed at worker launch;
* the ``[METRICS]`` line format the frontend parses lives in ``wire/metric_lines.py`` (the handlers import it
  and wire/ ships inside every archive);
* ``forkserver``, ``worker_python``, ``run_worker``, ``launch``: how TorchServe's workers start (forked
  from one preloaded process, or plain) and the launcher command that names their ``python``.

TorchServe is archived and 0.12.0 is its last release; the patches are written for exactly that version.
:func:`unsupported` is the guard: on any other version ``serve start`` refuses and the worker patches
switch off, each saying why.
"""
from __future__ import annotations

SUPPORTED_VERSION = "0.12.0"


def installed_version() -> str | None:
    """The installed TorchServe's version (``ts/version.txt``), or None when it is not installed."""
    try:
        from ts.version import __version__
    except (ImportError, OSError):
        return None
    return str(__version__).strip()


def unsupported(version: str | None = None) -> str | None:
    """None when ``version`` (default: the installed one) is the TorchServe the patches are written for;
    else a one-line reason they must stay off."""
    version = installed_version() if version is None else version
    if version == SUPPORTED_VERSION:
        return None
    found = f"TorchServe {version} is installed" if version else "TorchServe is not installed"
    return (f"{found}, but this project's TorchServe patches (serve/torchserve/, docs/torchserve-patches.md) "
            f"are written for TorchServe {SUPPORTED_VERSION} only")
