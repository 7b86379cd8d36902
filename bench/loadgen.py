"""Closed-loop load on one endpoint with one fixed POST body, its numbers returned as a dict.

:func:`run_wrk` runs ``wrk`` (Debian package ``wrk``), the benchmark's generator: each of ``connections``
keeps exactly one request in flight, so req/s at c connections is the server's throughput at concurrency c.
It runs on the same cores as the server and takes CPU from it; ``threads=1`` (the default) keeps that share
small. :func:`run_threads` does the same with Python threads and the standard library, for machines without
wrk (its numbers are lower bounds: the client costs more CPU); :func:`run_load` picks wrk when it is there.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

LUA_SCRIPT = Path(__file__).resolve().parent / "lua" / "post.lua"


class LoadGenError(RuntimeError):
    """wrk is missing, failed, or printed no result line; the message says which."""


def wrk_path() -> str:
    """Path of the wrk binary; raises LoadGenError with the install command if it is missing."""
    path = shutil.which("wrk")
    if path is None:
        raise LoadGenError("wrk is not installed: apt-get install -y wrk (Debian package 'wrk')")
    return path


def _check_target(url: str, connections: int) -> None:
    if connections < 1:
        raise ValueError(f"connections must be >= 1, got {connections}")
    if not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise ValueError(f"load is only ever sent to loopback addresses, got {url}")


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
    _check_target(url, connections)
    threads = max(1, min(threads, connections))
    # wrk reads its times as whole seconds ("-d0.5s" is a usage error): round up; its report gives the real window
    with tempfile.NamedTemporaryFile(prefix="wrk-body-", delete=False) as handle:
        handle.write(body)
        body_file = handle.name
    try:
        cmd = [
            wrk_path(), f"-t{threads}", f"-c{connections}", f"-d{max(1, math.ceil(seconds))}s",
            f"--timeout={max(1, math.ceil(timeout_s))}s",
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


def run_threads(
    url: str,
    body: bytes,
    content_type: str,
    connections: int,
    seconds: float = 10.0,
    token: str | None = None,
    timeout_s: float = 10.0,
    headers: dict[str, str] | None = None,
    warmup_s: float = 0.5,
) -> dict:
    """:func:`run_wrk`'s measurement with ``connections`` Python threads, each on its own keep-alive
    connection (standard library only); the same keys, measured over ``seconds`` after ``warmup_s``.

    ``errors`` counts connection failures and HTTP statuses >= 400; latency percentiles are over the
    answered requests (None when there were none)."""
    _check_target(url, connections)
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    sent = {"Content-Type": content_type, **(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    start_at = threading.Barrier(connections + 1)
    results: list[list[tuple[float, int]]] = [[] for _ in range(connections)]
    window: dict[str, float] = {}

    def connect() -> http.client.HTTPConnection:
        return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)

    def worker(index: int) -> None:
        connection = connect()
        try:
            start_at.wait()
            while (sent_at := time.perf_counter()) < window["end"]:
                try:
                    connection.request("POST", path, body=body, headers=sent)
                    response = connection.getresponse()
                    response.read()
                    status = response.status
                except (OSError, http.client.HTTPException):
                    status = -1
                    connection.close()
                    connection = connect()
                if sent_at >= window["start"]:
                    results[index].append((time.perf_counter() - sent_at, status))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for thread in threads:
        thread.start()
    window["start"] = time.perf_counter() + warmup_s
    window["end"] = window["start"] + seconds
    start_at.wait()
    for thread in threads:
        thread.join()
    answered = sorted(latency for per_thread in results for latency, status in per_thread if 0 < status < 400)
    errors = sum(1 for per_thread in results for _, status in per_thread if not 0 < status < 400)

    def percentile(q: float) -> float | None:  # nearest rank, in ms
        return answered[min(len(answered) - 1, int(q / 100 * len(answered)))] * 1e3 if answered else None

    return {
        "requests": len(answered) + errors,
        "seconds": seconds,
        "req_per_s": (len(answered) + errors) / seconds,
        "p50_ms": percentile(50),
        "p90_ms": percentile(90),
        "p99_ms": percentile(99),
        "max_ms": answered[-1] * 1e3 if answered else None,
        "mean_ms": sum(answered) / len(answered) * 1e3 if answered else None,
        "errors": errors,
    }


def run_load(url: str, body: bytes, content_type: str, connections: int, seconds: float = 10.0, **options) -> dict:
    """:func:`run_wrk` where wrk is installed, else :func:`run_threads`; ``generator`` in the result says which."""
    if shutil.which("wrk"):
        return {**run_wrk(url, body, content_type, connections, seconds, **options), "generator": "wrk"}
    options.pop("threads", None)
    return {**run_threads(url, body, content_type, connections, seconds, **options), "generator": "python threads"}
