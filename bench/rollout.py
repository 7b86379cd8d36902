"""Time from ``rollout`` to the new default serving: ``python -m bench.rollout [--runs 3] [--gate-samples 2000]``.

Starts a private TorchServe serving mnistnet 1.0 (``weights/mnistnet.pt``) on free ports, builds version 2.0 from
the same weights (the gate compares equal models, so it always passes: what is timed is the machinery), then
``--runs`` times: ``rollout mnistnet 2.0`` (register, workers READY, gate, set-default) and ``rollback``. For each
rollout it prints the phases from the report (load, gate, promotion, drain) and the end-to-end time until the first
unversioned request is answered by 2.0. Results go in bench/README.md ("Rollout").
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import requests

from paths import WEIGHTS_DIR
from serve.package import package_models
from serve.rollout import Rollout
from serve.server import Ports, Server

MODEL = "mnistnet"


def first_answer_from(server: Server, version: str, started: float, timeout: float = 120) -> float:
    """Seconds from ``started`` until an unversioned prediction says ``version`` answered."""
    key = server.keys()["inference"]
    body = {"data": [0.0] * 784}
    while time.perf_counter() - started < timeout:
        response = requests.post(f"{server.inference_url}/predictions/{MODEL}", json=body, timeout=10,
                                 headers={"Authorization": f"Bearer {key}"})
        if response.ok and response.headers.get("X-Model-Version") == version:
            return time.perf_counter() - started
        time.sleep(0.01)
    raise TimeoutError(f"{version} never answered")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gate-samples", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        root = Path(tmp)
        weights, store = root / "weights", root / "store"
        weights.mkdir()
        shutil.copy2(WEIGHTS_DIR / f"{MODEL}.pt", weights / f"{MODEL}.pt")
        shutil.copy2(WEIGHTS_DIR / f"{MODEL}.pt", weights / f"{MODEL}-v2.0.pt")
        package_models([MODEL], weights, store)
        package_models([MODEL], weights, store, version="2.0")
        server = Server(models=[MODEL], workdir=root / "work", tmpdir=root / "tmp", log_dir=root / "logs",
                        model_store=store, ports=Ports.free())
        server.start()
        try:
            server.wait_ready(progress=False)
            runner = Rollout(server, log=lambda line: None)
            totals = []
            for run in range(1, args.runs + 1):
                started = time.perf_counter()
                report = runner.rollout(MODEL, "2.0", gate_samples=args.gate_samples)
                serving = first_answer_from(server, "2.0", started)
                totals.append(serving)
                gate = report["promoted_after_s"] - report["load_s"]
                print(f"run {run}: load+READY {report['load_s']:.2f} s, gate ({report['samples']} samples) and "
                      f"set-default {gate:.2f} s, 2.0 answering {serving:.2f} s after the start; whole command "
                      f"(old version drained and retired) {report['seconds']:.2f} s, of which the drain (1.0's in-flight count "
                      f"polled to 0) {report['drain_s']:.2f} s", flush=True)
                runner.rollback(MODEL)
            print(f"median time to the new default serving: {statistics.median(totals):.2f} s ({args.runs} runs)")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
