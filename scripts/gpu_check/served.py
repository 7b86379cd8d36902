"""The GPU check's served part: a real TorchServe, where Java and TorchServe are installed.

Archives from serve/package.py, TorchServe from serve/server.py on free ports with private directories
(TorchServe hands its workers GPUs itself), then: every worker logged the device it serves on, the
parity over HTTP (binary OIP requests sent by the project's client, client/api.py) and served throughput
with bench/loadgen.py (wrk where installed, else its Python threads).
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import time
from pathlib import Path

from scripts.gpu_check import CHUNK, Report, digits_for, mnist_test, oip_headers, parity_check, throughput_model

SERVED_LOAD = [(1, 1), (16, 1), (1, CHUNK), (4, CHUNK)]  # (connections, images per request)


def java_path() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


def unavailable() -> str | None:
    """Why TorchServe cannot be started here (Java, ts, model_archiver, serve/'s imports), or None."""
    reasons = []
    if java_path() is None:
        reasons.append("java not found (JAVA_HOME or PATH)")
    for module, what in (("ts", "TorchServe"), ("model_archiver", "torch-model-archiver"),
                         ("serve.server", "serve/server.py"), ("serve.package", "serve/package.py")):
        try:
            importlib.import_module(module)
        except Exception as err:
            reasons.append(f"{what} not importable ({err})")
    return "; ".join(reasons) or None


def worker_devices(log_dir: Path) -> dict[str, list[str]]:
    """model → the devices its workers logged (``serving <model> (<class>) on <device> with ...``)."""
    devices: dict[str, list[str]] = {}
    for path in sorted(Path(log_dir).glob("model_log*.log")):
        for match in re.finditer(r"serving (\S+) \((\w+)\) on (\S+) with", path.read_text(errors="replace")):
            devices.setdefault(match.group(1), []).append(match.group(3))
    return devices


def number_of_gpu() -> str:
    from serve.server import DEFAULT_CONFIG, load_properties

    return load_properties(DEFAULT_CONFIG).get("number_of_gpu", "unset (all GPUs)")


def check_workers(report: Report, server, names: list[str], descriptions: dict, want: str, timeout: float = 15.0) -> None:
    """Every worker logged its device and it is of type ``want``; the describe API's gpu flags agree."""
    expected = {name: len(descriptions[name].get("workers", [])) for name in names}
    deadline = time.monotonic() + timeout  # log4j writes asynchronously (async_logging=true)
    while True:
        logged = worker_devices(server.log_dir)
        if all(len(logged.get(n, [])) >= expected[n] for n in names) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    flags = {n: [w.get("gpu") for w in descriptions[n].get("workers", [])] for n in names}
    wrong = {n: logged.get(n, []) for n in names
             if len(logged.get(n, [])) < expected[n] or any(not d.startswith(want) for d in logged.get(n, []))}
    wrong_flags = {n: f for n, f in flags.items() if any(flag is not None and bool(flag) != (want == "cuda") for flag in f)}
    summary = ", ".join(f"{n} {'/'.join(logged.get(n, [])) or 'nothing logged'}" for n in names)
    if wrong or wrong_flags:
        hint = "" if want != "cuda" else (
            f" (config.properties number_of_gpu={number_of_gpu()}; TorchServe counts GPUs with nvidia-smi: is it on PATH?)")
        report.check("workers", "FAIL", f"expected every worker on {want}: {summary}; describe gpu flags "
                     f"{flags}{hint}", logged=logged, gpu_flags=flags)
    else:
        report.check("workers", "PASS", f"{sum(expected.values())} workers of {len(names)} models logged 'serving ... on "
                     f"{want}': {summary}; describe API gpu={sorted({str(f) for fl in flags.values() for f in fl})}",
                     logged=logged, gpu_flags=flags)


def answer_with(client, name: str):
    """``(array, datatype) → (status, OIP response)`` through ``client.predict_v2`` with binary tensors."""
    from client.api import TorchServeError

    def answer(array, datatype: str) -> tuple[int, dict]:
        try:
            return 200, client.predict_v2(name, array, datatype=datatype, binary=True)
        except TorchServeError as err:
            return err.status or -1, {"error": str(err)[:300]}

    return answer


def run(report: Report, names: list[str], weights: dict[str, Path], device, work: Path, seconds: float,
        digits=None) -> None:
    """Package, start TorchServe, check the workers' devices, served parity and HTTP throughput, stop."""
    import torch

    from bench.loadgen import run_load
    from client.api import TorchServeClient
    from client.oip import binary_v2_request
    from serve.package import package_models
    from serve.server import Ports, Server

    want = torch.device(device).type
    report.info(f"TorchServe: config.properties number_of_gpu={number_of_gpu()}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}")
    try:
        started = time.perf_counter()
        store = work / "store"
        package_models(names, weights[names[0]].parent, store, rebuild=True)
        report.check("package", "PASS", f"{len(names)} archives built by serve/package.py in "
                     f"{time.perf_counter() - started:.1f} s into {store}")
    except Exception as err:
        report.check("package", "FAIL", f"{type(err).__name__}: {err}")
        return
    server = Server(ports=Ports.free(), tmpdir=work / "tmp", workdir=work / "work", model_store=store,
                    models=names, log_dir=work / "logs")
    try:
        started = time.perf_counter()
        server.start()
        descriptions = server.wait_ready(timeout=300, progress=False)
        report.check("server", "PASS", f"TorchServe with {len(names)} models READY in {time.perf_counter() - started:.1f} s "
                     f"(inference port {server.ports.inference})", cold_start_s=round(time.perf_counter() - started, 2))
    except Exception as err:
        report.check("server", "FAIL", f"{type(err).__name__}: {err}")
        server.stop()
        return
    try:
        check_workers(report, server, names, descriptions, want)
        client = TorchServeClient(server.inference_url, server.management_url, key_file=server.key_file,
                                  timeout=60, retries=0)
        digits = digits_for(names, digits)
        for name in names:
            parity_check(report, name, "served-parity", f"POST /v2/models/{name}/infer (binary OIP, {CHUNK}/request) "
                         "vs the network on the CPU", answer_with(client, name), weights[name], digits)

        name = throughput_model(names)
        if name is None:
            report.check("throughput[served]", "SKIP", "no image model served")
            return
        images = (digits[0] if digits is not None else mnist_test()[0])[:CHUNK]
        key = server.keys().get("inference")
        for connections, batch in SERVED_LOAD:
            body, header_length = binary_v2_request(images[:batch], datatype="UINT8")
            headers = oip_headers(header_length)
            content_type = headers.pop("Content-Type")
            label = (f"throughput[served, {name}, {connections} connection{'s' if connections > 1 else ''}, "
                     f"{batch} image{'s' if batch > 1 else ''}/request]")
            try:
                r = run_load(f"{server.inference_url}/v2/models/{name}/infer", body, content_type, connections,
                             seconds, token=key, headers=headers)
            except Exception as err:
                report.check(label, "FAIL", f"{type(err).__name__}: {err}")
                continue
            r.pop("raw", None)
            r.update(connections=connections, images_per_request=batch, samples_per_s=r["req_per_s"] * batch)
            ok = r["requests"] > 0 and r["errors"] == 0
            p50 = f"{r['p50_ms']:.2f}" if r["p50_ms"] is not None else "-"
            p99 = f"{r['p99_ms']:.2f}" if r["p99_ms"] is not None else "-"
            report.check(label, "PASS" if ok else "FAIL",
                         f"{r['req_per_s']:,.0f} req/s = {r['samples_per_s']:,.0f} samples/s, p50 {p50} ms, p99 {p99} ms, "
                         f"{r['errors']} errors ({r['requests']} requests in {seconds:g} s, {r['generator']})", **r)
    finally:
        if report.failed:
            report.info("TorchServe logs, last lines:\n" + server.output_tail(20))
        server.stop()
