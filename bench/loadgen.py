"""Run ``wrk`` against one endpoint with one fixed POST body and return its numbers as a dict.

wrk (Debian package ``wrk``) is a closed-loop generator: each of ``connections`` keeps exactly one request
in flight, so req/s at c connections is the server's throughput at concurrency c. It runs on the same
cores as the server and takes CPU from it; ``threads=1`` (the default) keeps that share small.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

LUA_SCRIPT = Path(__file__).resolve().parent / "lua" / "post.lua"


class LoadGenError(RuntimeError):
    """wrk is missing, failed, or printed no result line; the message says which."""


def wrk_path() -> str:
    """Path of the wrk binary; raises LoadGenError with the install command if it is missing."""
    path = shutil.which("wrk")
    if path is None:
        raise LoadGenError("wrk is not installed: apt-get install -y wrk (Debian package 'wrk')")
    return path


def run_wrk(
    url: str,
    body: bytes,
    content_type: str,
    connections: int,
    seconds: float = 10.0,
    token: str | None = None,
    threads: int = 1,
    timeout_s: float = 10.0,
    headers: dict[str, str] | None = None,
) -> dict:
    """POST ``body`` to ``url`` over ``connections`` keep-alive connections for ``seconds``.

    Returns wrk's summary: ``req_per_s``, ``p50_ms``/``p90_ms``/``p99_ms``/``max_ms``, ``requests``,
    ``errors`` (socket errors + HTTP statuses >= 400 + timeouts) and the raw fields. ``token`` is sent
    as ``Authorization: Bearer <token>`` (through the environment, not the command line); ``headers`` are
    sent as well (e.g. ``Inference-Header-Content-Length`` for a binary Open Inference Protocol body).
    """
    if connections < 1:
        raise ValueError(f"connections must be >= 1, got {connections}")
    if not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise ValueError(f"load is only ever sent to loopback addresses, got {url}")
    threads = max(1, min(threads, connections))
    with tempfile.NamedTemporaryFile(prefix="wrk-body-", delete=False) as handle:
        handle.write(body)
        body_file = handle.name
    try:
        cmd = [
            wrk_path(), f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={timeout_s:g}s",
            "-s", str(LUA_SCRIPT), url, "--", body_file, content_type,
        ]
        env = {**os.environ, "WRK_AUTH": f"Bearer {token}" if token else "",
               "WRK_HEADERS": "\n".join(f"{name}: {value}" for name, value in (headers or {}).items())}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    finally:
        os.unlink(body_file)
    return parse_wrk_output(proc.stdout, proc.stderr, proc.returncode)


def parse_wrk_output(stdout: str, stderr: str = "", returncode: int = 0) -> dict:
    """The dict of the ``WRK_JSON {...}`` line that bench/lua/post.lua prints, plus derived fields."""
    lines = [line for line in stdout.splitlines() if line.startswith("WRK_JSON ")]
    if returncode != 0 or not lines:
        raise LoadGenError(f"wrk failed (exit code {returncode}):\n{stdout}\n{stderr}".strip())
    raw = json.loads(lines[-1][len("WRK_JSON "):])
    seconds = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in raw if k.startswith("errors_"))
    return {
        "requests": raw["requests"],
        "seconds": seconds,
        "req_per_s": raw["requests"] / seconds if seconds > 0 else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
        "errors": errors,
        "raw": raw,
    }
