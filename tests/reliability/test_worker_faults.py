"""Worker faults under load: SIGKILL the mnistnet worker KILLS times while threads keep sending requests.

TorchServe notices the dead worker, starts a new one and sends it the queued requests (and, with the
agent's patch, serve/torchserve/java/HeldJobs.java, the requests held for a batch that was still filling). Measured
and printed: seconds from each kill until every worker is READY again, how many requests failed and with
what. Asserted: every request gets an HTTP answer within the model's response timeout (none hangs); only
requests in flight at a kill fail (at most one per load thread per kill), each with TorchServe's exact
"Worker died." JSON error (500, or 507 when the worker's exit status is 137) naming the request's
``X-Request-ID`` in its header and body; requests to the other model
never fail; every request sent after the last recovery succeeds with the right answer; each new worker is
a different process. Run in both worker launch modes (fork server on and off) and once with CPU hogs
beside the server (two busy-loop processes), where the timing of the kills shifts.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import psutil
import pytest
import requests

from serve.package import RESPONSE_TIMEOUT_S
from servers import all_ready, clean_env, worker_pids

from .support import JSON, png_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

IMAGE_THREADS = 6  # load threads on mnistnet (the model whose worker is killed)
TABULAR_THREADS = 2  # load threads on mlp (its worker is left alone)
KILLS = 3  # SIGKILLs of the mnistnet worker per run
KILL_AFTER_S = 3.0  # load runs this long before the first kill, and after each recovery before the next
AFTER_RECOVERY_S = 3.0  # load goes on this long after the last recovery
RECOVERY_LIMIT_S = 90.0  # a server that has not recovered by then is broken
# Every request must be answered within the model's responseTimeout (the archives' model-config.yaml);
# the client waits a little longer, so that a request left hanging shows up as no answer.
CLIENT_TIMEOUT_S = RESPONSE_TIMEOUT_S + 10.0
CPU_HOGS = 2  # busy-loop processes beside the server in the "busy" case
WORKER_DIED = {500, 507}  # TorchServe: 507 when the dead worker's exit status is 137 (SIGKILL), else 500


@dataclass
class Outcome:
    model: str
    started: float
    finished: float
    status: int | None  # None: no HTTP response (connection error / timeout)
    detail: str
    sent_id: str = ""  # the request's X-Request-ID
    answer_id: str | None = None  # the answer's


def load_loop(server, model: str, bodies: list[tuple[bytes, dict, object]], stop: threading.Event,
              outcomes: list, check) -> None:
    """Send ``bodies`` round-robin until ``stop``; record an Outcome per request (``check`` validates 200s)."""
    session = requests.Session()
    url = f"{server.inference_url}/predictions/{model}"
    i = 0
    while not stop.is_set():
        body, headers, expected = bodies[i % len(bodies)]
        i += 1
        sent_id, answer_id = f"{model}-{threading.get_ident()}-{i}", None
        started = time.monotonic()
        try:
            response = session.post(url, data=body, timeout=CLIENT_TIMEOUT_S, headers={
                **headers, "Authorization": f"Bearer {server.keys()['inference']}", "X-Request-ID": sent_id})
            status, detail, answer_id = response.status_code, response.text[:400], response.headers.get("X-Request-ID")
            if status == 200 and not check(response.json(), expected):
                status, detail = -1, f"wrong answer: {detail}"
        except requests.RequestException as err:
            status, detail = None, f"{type(err).__name__}: {err}"[:400]
        outcomes.append(Outcome(model, started, time.monotonic(), status, detail, sent_id, answer_id))


def wait_recovered(server, old_pid: int, since: float) -> float:
    """Seconds from ``since`` until every worker is READY and mnistnet's worker is a new process."""
    while time.monotonic() - since < RECOVERY_LIMIT_S:
        if all_ready(server) and worker_pids(server)["mnistnet"][0][1] != old_pid:
            return time.monotonic() - since
        time.sleep(0.05)
    pytest.fail(f"workers not READY again {RECOVERY_LIMIT_S:.0f} s after the kill: {server.output_tail()}")


def cpu_hogs(count: int) -> list[subprocess.Popen]:
    """``count`` busy-loop processes (the caller kills them)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], env=clean_env()) for _ in range(count)]


@pytest.mark.parametrize("fork_workers,hogs", [(True, 0), (False, 0), (True, CPU_HOGS)],
                         ids=["forkserver", "no-forkserver", "forkserver-busy"])
def test_sigkill_worker_under_load(fork_workers, hogs, start_server, digits, reference):
    server = start_server("faults", fork_workers=fork_workers)
    images, _ = digits
    probabilities = reference.probabilities("mnistnet", images[:16])
    image_bodies = [(png_of(images[i]), {"Content-Type": "image/png"}, probabilities[i]) for i in range(16)]
    rows = np.random.default_rng(0).uniform(-1.5, 1.5, size=(8, 2))
    mlp_out = reference.outputs("mlp", rows)
    tabular_bodies = [(f'{{"data": [{rows[i, 0]}, {rows[i, 1]}]}}'.encode(), JSON, mlp_out[i]) for i in range(8)]
    check_image = lambda answer, p: np.allclose(answer["probabilities"], p, atol=1e-5)
    check_mlp = lambda answer, p: np.allclose(answer["probabilities"], [p], atol=1e-5)

    before = worker_pids(server)
    outcomes: list[Outcome] = []
    kills: list[tuple[int, float, float]] = []  # (pid, killed at, seconds to recover)
    stop = threading.Event()
    threads = [threading.Thread(target=load_loop, args=(server, "mnistnet", image_bodies, stop, outcomes, check_image))
               for _ in range(IMAGE_THREADS)]
    threads += [threading.Thread(target=load_loop, args=(server, "mlp", tabular_bodies, stop, outcomes, check_mlp))
                for _ in range(TABULAR_THREADS)]
    hog_processes = cpu_hogs(hogs)
    load_start = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        for _ in range(KILLS):
            time.sleep(KILL_AFTER_S)
            pid = worker_pids(server)["mnistnet"][0][1]
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            kills.append((pid, killed_at, wait_recovered(server, pid, killed_at)))
        time.sleep(AFTER_RECOVERY_S)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=CLIENT_TIMEOUT_S + 5)
        for hog in hog_processes:
            hog.kill()
            hog.wait()
    try:
        check_outcomes(server, outcomes, before, kills, load_start, hogs)
    finally:
        server.stop()  # free its workers now rather than at the end of the session


def worker_died_answer(outcome: Outcome) -> bool:
    """True if ``outcome`` is TorchServe's JSON "Worker died." error with a matching code, naming the
    request's ID in header and body."""
    try:
        body = json.loads(outcome.detail)
    except ValueError:
        return False
    return (outcome.status in WORKER_DIED and body.get("code") == outcome.status
            and body.get("message") == "Worker died." and body.get("type") == "InternalServerException"
            and body.get("request_id") == outcome.answer_id == outcome.sent_id)


def check_outcomes(server, outcomes: list[Outcome], before: dict, kills: list[tuple[int, float, float]],
                   load_start: float, hogs: int) -> None:
    """Print the measurements, then assert what the module docstring says."""
    recovered_at = max(killed_at + recovery_s for _, killed_at, recovery_s in kills)
    image = [o for o in outcomes if o.model == "mnistnet"]
    failed = [o for o in image if o.status != 200]
    after = [o for o in image if o.started > recovered_at]
    slowest = max(outcomes, key=lambda o: o.finished - o.started)
    new_pid = worker_pids(server)["mnistnet"][0][1]
    print(
        f"\nworker fault: {len(kills)} SIGKILLs of the mnistnet worker under load "
        f"({IMAGE_THREADS}+{TABULAR_THREADS} threads, {hogs} CPU hogs, {time.monotonic() - load_start:.1f} s in all)\n"
        + "".join(f"  kill {i + 1}: pid {pid}, every worker READY again after {recovery_s:.2f} s\n"
                  for i, (pid, _, recovery_s) in enumerate(kills))
        + f"  mnistnet requests: {len(image)} sent, {len(failed)} failed "
        f"{dict(Counter(o.status for o in failed))}, {len(after)} sent after the last recovery\n"
        f"  slowest answer: {slowest.finished - slowest.started:.2f} s ({slowest.model}, {slowest.status})\n"
        f"  mlp requests: {sum(o.model == 'mlp' for o in outcomes)} sent, "
        f"{sum(o.model == 'mlp' and o.status != 200 for o in outcomes)} failed"
    )
    for o in failed:
        print(f"  failed at +{o.started - load_start:.2f} s: {o.status} {o.detail!r}")

    unanswered = [o for o in outcomes if o.status is None or o.finished - o.started > RESPONSE_TIMEOUT_S]
    assert unanswered == [], f"requests not answered within the response timeout ({RESPONSE_TIMEOUT_S} s): {unanswered}"
    for pid, _, _ in kills:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert len({pid for pid, _, _ in kills} | {new_pid}) == len(kills) + 1, "every restart is a new process"
    assert worker_pids(server)["mlp"] == before["mlp"], "the other model's worker must be untouched"
    # Only requests in flight at a kill may fail: each load thread has at most one request in flight.
    assert len(failed) <= IMAGE_THREADS * len(kills), [f"{o.status} {o.detail}" for o in failed]
    assert all(worker_died_answer(o) for o in failed), [f"{o.status} {o.detail}" for o in failed]
    in_flight = lambda o: any(o.started <= killed_at + 1.0 and o.finished >= killed_at for _, killed_at, _ in kills)
    assert all(in_flight(o) for o in failed), "a request that was not in flight at a kill failed"
    assert [o for o in outcomes if o.model == "mlp" and o.status != 200] == []
    assert len(after) >= IMAGE_THREADS and all(o.status == 200 for o in after)
