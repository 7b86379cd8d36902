"""scripts/gpu_check.py, run here without a GPU: the no-GPU exit, and every check's logic on the CPU.

The script's functions take a device; here it is ``cpu``, so the handler loading, parity, throughput and
HTTP load code the GPU run uses is exercised on the CPU with the real handlers, through TorchServe's
``Context`` and through the script's ``MinimalContext`` (what runs on a GPU box without ``ts``).
``test_served_checks_against_a_real_torchserve`` starts a real TorchServe (marked e2e).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from models.registry import get_spec
from train.data import mnist_arrays

from paths import REPO_ROOT as REPO
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


@pytest.fixture(autouse=True)
def keep_torch_threads(monkeypatch):
    """initialize() sets torch's thread count for the whole process: keep this process's value."""
    monkeypatch.setenv("HANDLER_NUM_THREADS", str(torch.get_num_threads()))


@pytest.fixture(scope="module")
def digits():
    images, labels = mnist_arrays("test")
    return images[:600], labels[:600]


def seeded_weights(directory: Path, names, seed: int = 1234) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        torch.manual_seed(seed)
        torch.save(get_spec(name).build().state_dict(), directory / f"{name}.pt")
    return directory


def run_summary(argv) -> tuple[int, dict]:
    out = Path(argv[argv.index("--out") + 1])
    code = gpu_check.main(argv)
    return code, json.loads(out.read_text())


# ------------------------------------------------------------------------------------------- no GPU


def test_the_command_without_a_gpu_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, also on a machine that has one
    result = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--weights", str(tmp_path / "none"),
                             "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no GPU (torch.cuda.is_available() is False): nothing to check"
    assert json.loads(out.read_text()) == {"gpu": False, "message": gpu_check.NO_GPU_MESSAGE, "ok": True, "checks": []}


def test_main_without_cuda_checks_nothing(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert gpu_check.main(["--device", "cuda:0"]) == 0
    assert capsys.readouterr().out.splitlines() == [gpu_check.NO_GPU_MESSAGE] * 2


# ------------------------------------------------------------------------- contexts and handlers


def test_context_api_prefers_torchserve_and_falls_back_to_the_minimal_context():
    from ts.context import Context, RequestProcessor

    assert gpu_check.context_api()[:2] == (Context, RequestProcessor)
    context_class, processor_class, label = gpu_check.context_api(minimal=True)
    assert (context_class, processor_class) == (gpu_check.MinimalContext, gpu_check.MinimalRequestProcessor)
    assert "MinimalContext" in label


def _mixed_batch(handler, context, api, images):
    """A valid binary OIP request, 0-255 JSON pixels (400) and a valid native JSON image, in one batch."""
    _, RequestProcessor, _ = api
    (body, length, _), = gpu_check.build_requests(images[:3], "UINT8", chunk=3)
    requests = [{"body": bytearray(body)}, {"body": {"data": images[0].astype(float).tolist()}},
                {"body": {"data": (images[1] / 255.0).tolist()}}]
    context.request_processor = [RequestProcessor(gpu_check.oip_headers(length)), RequestProcessor({}),
                                 RequestProcessor({"Content-Type": "application/json"})]
    context.request_ids = {0: "a", 1: "b", 2: "c"}
    bodies = handler.handle(requests, context)
    return bodies, [context.get_response_status(i) for i in range(3)], [dict(context.get_response_headers(i)) for i in range(3)]


def test_minimal_context_drives_the_real_handlers_like_torchserves(tmp_path, digits):
    weights = seeded_weights(tmp_path / "w", ["mnistnet"])
    answers = {}
    for minimal in (False, True):
        api = gpu_check.context_api(minimal=minimal)
        handler, context = gpu_check.load_handler("mnistnet", weights / "mnistnet.pt", tmp_path / f"m{minimal}", "cpu", api)
        assert isinstance(context, api[0]) and handler.device == torch.device("cpu")
        assert context.system_properties["gpu_id"] is None and handler.model_version == "1.0"
        answers[minimal] = _mixed_batch(handler, context, api, digits[0])
    bodies, statuses, headers = answers[True]
    assert answers[True] == answers[False]  # same bodies, statuses and response headers
    assert [s[0] for s in statuses] == [200, 400, 200] and "divide by 255" in statuses[1][1]
    assert headers[0]["content-type"] == "application/octet-stream" and "Inference-Header-Content-Length" in headers[0]
    assert headers[1]["content-type"] == headers[2]["content-type"] == "application/json"
    assert json.loads(bodies[2])["predicted_class"] in range(10)


def test_minimal_context_serves_a_tabular_model(tmp_path):
    weights = seeded_weights(tmp_path / "w", ["mlp"])
    api = gpu_check.context_api(minimal=True)
    handler, context = gpu_check.load_handler("mlp", weights / "mlp.pt", tmp_path / "m", "cpu", api)
    wire, datatype, x, labels = gpu_check.check_inputs(get_spec("mlp"))
    assert datatype == "FP32" and wire.shape == (gpu_check.TABULAR_ROWS, 2) and labels is None
    statuses, responses = gpu_check.handle_requests(handler, context, gpu_check.build_requests(wire, datatype), api)
    assert statuses == [200] * (gpu_check.TABULAR_ROWS // gpu_check.CHUNK)
    result = gpu_check.compare(get_spec("mlp"), statuses, responses, gpu_check.reference_outputs(get_spec("mlp"), weights / "mlp.pt", x))
    assert result["status"] == "PASS" and result["max_abs_diff"] < 1e-6 and result["class_mismatches"] == 0


# --------------------------------------------------------------------------- parity and throughput


@pytest.mark.parametrize("name", ["mnistnet", "regressionnet"])
def test_parity_passes_for_the_same_network_and_catches_a_different_one(name, tmp_path, digits):
    spec = get_spec(name)
    weights = seeded_weights(tmp_path / "w", [name])
    other = seeded_weights(tmp_path / "other", [name], seed=99)
    handler, context = gpu_check.load_handler(name, weights / f"{name}.pt", tmp_path / "m", "cpu")
    wire, datatype, x, labels = gpu_check.check_inputs(spec, digits)
    statuses, responses = gpu_check.handle_requests(handler, context, gpu_check.build_requests(wire, datatype))

    same = gpu_check.compare(spec, statuses, responses, gpu_check.reference_outputs(spec, weights / f"{name}.pt", x), labels)
    assert same["status"] == "PASS", same
    assert same["samples"] == len(wire) and same["max_abs_diff"] < 1e-5
    if spec.is_image_model:
        assert same["class_mismatches"] == 0 and same["accuracy"] == same["reference_accuracy"]

    different = gpu_check.compare(spec, statuses, responses, gpu_check.reference_outputs(spec, other / f"{name}.pt", x), labels)
    assert different["status"] == "FAIL" and "EXCEEDS" in different["detail"]

    failed = gpu_check.compare(spec, [200, 503], responses[:2], {"x": None})
    assert failed["status"] == "FAIL" and "1 of 2 requests answered [503]" in failed["detail"]


def test_handler_throughput_on_the_cpu(tmp_path, digits):
    weights = seeded_weights(tmp_path / "w", ["mnistnet"])
    handler, context = gpu_check.load_handler("mnistnet", weights / "mnistnet.pt", tmp_path / "m", "cpu")
    for batch in (1, 256):
        (request,) = gpu_check.build_requests(digits[0][:batch], "UINT8", chunk=batch)
        result = gpu_check.measure_handler(handler, context, request, seconds=0.1, device="cpu", warmup=0.02)
        assert result["batch"] == batch and result["calls"] >= 1 and result["seconds"] >= 0.1
        assert result["samples_per_s"] == pytest.approx(result["calls"] * batch / result["seconds"], rel=0.01)
    bad = (b'{"inputs": []}', 14, 1)
    with pytest.raises(RuntimeError, match="the handler answered 400"):
        gpu_check.measure_handler(handler, context, bad, seconds=0.1, device="cpu")


# ------------------------------------------------------------------------------------------ main


@pytest.mark.parametrize("minimal", [False, True])
def test_dry_run_on_the_cpu_passes_every_in_process_check(minimal, tmp_path, capsys):
    names = ["mnistnet", "mlp", "regressionnet"]
    weights = seeded_weights(tmp_path / "w", names)
    argv = ["--device", "cpu", "--no-server", "--models", ",".join(names), "--seconds", "0.1",
            "--weights", str(weights), "--out", str(tmp_path / "gpu.json")] + (["--minimal-context"] if minimal else [])
    code, summary = run_summary(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert summary["ok"] and summary["device"] == "cpu" and summary["counts"] == {"PASS": 8, "FAIL": 0, "SKIP": 1}
    statuses = {c["name"]: c["status"] for c in summary["checks"]}
    assert statuses == {
        "handler[mnistnet]": "PASS", "handler[mlp]": "PASS", "handler[regressionnet]": "PASS",
        "parity[mnistnet]": "PASS", "parity[mlp]": "PASS", "parity[regressionnet]": "PASS",
        "throughput[handler, mnistnet, 1 image/request]": "PASS",
        "throughput[handler, mnistnet, 256 images/request]": "PASS", "server": "SKIP",
    }
    parity = next(c for c in summary["checks"] if c["name"] == "parity[mnistnet]")
    assert parity["samples"] == 10_000 and parity["max_abs_diff"] <= 1e-4
    assert ("MinimalContext" in out) == minimal
    assert "PASS parity[mnistnet]: handle() on cpu vs the network on the CPU: 10000 test digits" in out
    assert "SKIP server: --no-server" in out and out.rstrip().splitlines()[-1].startswith("gpu-check OK: 8 passed")


def test_a_failed_check_makes_the_exit_status_non_zero(tmp_path, monkeypatch, capsys):
    weights = seeded_weights(tmp_path / "w", ["mnistnet"])
    real = gpu_check.reference_outputs

    def drifted(spec, weights_path, x):
        return {k: v + 1e-3 for k, v in real(spec, weights_path, x).items()}

    monkeypatch.setattr(gpu_check, "reference_outputs", drifted)
    code, summary = run_summary(["--device", "cpu", "--no-server", "--models", "mnistnet", "--seconds", "0.05",
                                 "--weights", str(weights), "--out", str(tmp_path / "gpu.json")])
    assert code == 1 and not summary["ok"] and summary["counts"]["FAIL"] == 1
    assert "FAIL parity[mnistnet]" in capsys.readouterr().out


def test_missing_weights_are_trained_with_the_registrys_training(tmp_path):
    report = gpu_check.Report()
    found = gpu_check.resolve_weights(["mlp"], tmp_path / "empty", tmp_path / "dest", "cpu", report)
    assert found == {"mlp": tmp_path / "dest" / "mlp.pt"} and found["mlp"].is_file()
    (check,) = report.checks
    assert check["name"] == "weights[mlp]" and check["status"] == "PASS" and "trained now on cpu" in check["detail"]


# ------------------------------------------------------------------------------------ served checks


def test_worker_devices_are_read_from_the_model_log(tmp_path):
    (tmp_path / "model_log.log").write_text(
        "2026-11-26 [INFO ] W-9000-mnistnet_1.0-stdout MODEL_LOG - serving mnistnet (MNISTNet) on cuda:0 with 1 thread(s)\n"
        "2026-11-26 [INFO ] W-9001-mnistnet_1.0-stdout MODEL_LOG - serving mnistnet (MNISTNet) on cuda:0 with 1 thread(s)\n"
        "2026-11-26 [INFO ] W-9002-mlp_1.0-stdout MODEL_LOG - serving mlp (MLP) on cpu with 1 thread(s)\n"
    )
    assert gpu_check.worker_devices(tmp_path) == {"mnistnet": ["cuda:0", "cuda:0"], "mlp": ["cpu"]}


class _StandIn(BaseHTTPRequestHandler):
    """POST /v2/models/<m>/infer answered by the real handler in this process, as TorchServe would."""

    protocol_version = "HTTP/1.1"
    handler = context = None
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            (status, headers), answer = self._handle(body)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def _handle(self, body):
        from ts.context import RequestProcessor

        self.context.request_processor = [RequestProcessor(dict(self.headers.items()))]
        self.context.request_ids = {0: "x"}
        (answer,) = self.handler.handle([{"body": bytearray(body)}], self.context)
        return (self.context.get_response_status(0)[0], self.context.get_response_headers(0)), bytes(answer)

    def log_message(self, *args):
        pass


def test_served_parity_and_http_load_against_a_stand_in_server(tmp_path, digits):
    weights = seeded_weights(tmp_path / "w", ["mnistnet"])
    handler, context = gpu_check.load_handler("mnistnet", weights / "mnistnet.pt", tmp_path / "m", "cpu")
    _StandIn.handler, _StandIn.context = handler, context
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        spec = get_spec("mnistnet")
        wire, datatype, x, labels = gpu_check.check_inputs(spec, digits)
        statuses, responses = gpu_check.served_answers(port, None, "mnistnet", gpu_check.build_requests(wire, datatype))
        result = gpu_check.compare(spec, statuses, responses, gpu_check.reference_outputs(spec, weights / "mnistnet.pt", x), labels)
        assert result["status"] == "PASS" and result["samples"] == len(wire), result

        (body, length, _), = gpu_check.build_requests(wire[:16], "UINT8", chunk=16)
        load = gpu_check.http_load(port, "/v2/models/mnistnet/infer", body, gpu_check.oip_headers(length),
                                   connections=4, seconds=0.5, samples_per_request=16, warmup=0.1)
        assert load["requests"] > 0 and load["errors"] == 0
        assert load["samples_per_s"] == pytest.approx(load["requests_per_s"] * 16)
        assert 0 < load["p50_ms"] <= load["p99_ms"]

        bad = gpu_check.http_load(port, "/v2/models/mnistnet/infer", b'{"inputs": []}', gpu_check.oip_headers(14),
                                  connections=2, seconds=0.2, samples_per_request=1, warmup=0.0)
        assert bad["errors"] > 0 and bad["requests"] == 0 and bad["p50_ms"] is None
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.e2e
@pytest.mark.slow
def test_served_checks_against_a_real_torchserve(tmp_path, capsys):
    """The served path on the CPU: archives, TorchServe, workers' device from model_log.log, parity, load."""
    reason = gpu_check.server_unavailable("cpu")
    if reason:
        pytest.skip(reason)
    names = ["mnistnet", "mlp"]
    weights = seeded_weights(tmp_path / "w", names)
    code, summary = run_summary(["--device", "cpu", "--models", ",".join(names), "--seconds", "0.5",
                                 "--weights", str(weights), "--out", str(tmp_path / "gpu.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    statuses = {c["name"]: c["status"] for c in summary["checks"]}
    for name in ("package", "server", "workers", "served-parity[mnistnet]", "served-parity[mlp]"):
        assert statuses[name] == "PASS", out
    served = [c for c in summary["checks"] if c["name"].startswith("throughput[served")]
    assert [(c["connections"], c["images_per_request"]) for c in served] == gpu_check.SERVED_LOAD
    assert all(c["status"] == "PASS" and c["requests"] > 0 for c in served)
    workers = next(c for c in summary["checks"] if c["name"] == "workers")
    assert workers["logged"] == {"mnistnet": ["cpu", "cpu"], "mlp": ["cpu"]}
