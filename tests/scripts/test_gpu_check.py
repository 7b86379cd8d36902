"""scripts/gpu_check/, run here without a GPU: the no-GPU exit, and every check's logic on the CPU.

The check's functions take a device; here it is ``cpu``, so the archive loading (TorchServe's model loader
and ``Service``, fed worker frames), parity, throughput and served code the GPU run uses is exercised on the
CPU with the real handlers. Expectations come from the network run directly in this process.
``test_served_checks_against_a_real_torchserve`` starts a real TorchServe (marked e2e).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import scripts.gpu_check as gpu_check
from bench.loadgen import run_threads
from client.api import TorchServeClient
from models.registry import get_spec
from paths import REPO_ROOT as REPO
from scripts.gpu_check import __main__ as cli
from scripts.gpu_check import inprocess, served
from servers import clean_env
from train.data import mnist_arrays, normalize_images


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


def network_on_cpu(name: str, weights: Path):
    model = get_spec(name).build()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def run_summary(argv) -> tuple[int, dict]:
    out = Path(argv[argv.index("--out") + 1])
    code = cli.main(argv)
    return code, json.loads(out.read_text())


# ------------------------------------------------------------------------------------------- no GPU


def test_the_command_without_a_gpu_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu.json"
    env = clean_env(CUDA_VISIBLE_DEVICES="")  # no GPU, also on a machine that has one
    result = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--weights", str(tmp_path / "none"),
                             "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no GPU (torch.cuda.is_available() is False): nothing to check"
    assert json.loads(out.read_text()) == {"gpu": False, "message": gpu_check.NO_GPU_MESSAGE, "ok": True, "checks": []}


def test_main_without_cuda_checks_nothing(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main([]) == 0
    assert cli.main(["--device", "cuda:0"]) == 0
    assert capsys.readouterr().out.splitlines() == [gpu_check.NO_GPU_MESSAGE] * 2


# ------------------------------------------------------------------------------- in-process worker


def test_the_worker_is_torchserves_service_with_the_real_handler(tmp_path, digits):
    """Loaded by TorchServe's model loader from a real archive; one frame of three requests (binary OIP,
    0-255 JSON pixels: 400, native JSON) answered per request, as the frontend reads it."""
    from ts.context import Context
    from ts.service import Service

    from client.oip import binary_v2_request, parse_binary_v2_response
    from handlers.image_classifier import ImageClassifier

    weights = seeded_weights(tmp_path / "w", ["mnistnet"])
    worker = inprocess.Worker("mnistnet", weights / "mnistnet.pt", tmp_path / "root", "cpu")
    try:
        assert isinstance(worker.service, Service) and isinstance(worker.context, Context)
        assert type(worker.handler).__name__ == ImageClassifier.__name__ and worker.handler.device == torch.device("cpu")
        assert worker.context.system_properties["gpu_id"] is None and worker.handler.model_version == "1.0"
        images = digits[0]
        body, length = binary_v2_request(images[:3], datatype="UINT8")
        answers = worker.send([
            (body, gpu_check.oip_headers(length)),
            (json.dumps({"data": images[0].astype(float).tolist()}).encode(), {"Content-Type": "application/json"}),
            (json.dumps({"data": (images[1] / 255.0).tolist()}).encode(), {"Content-Type": "application/json"}),
        ])
    finally:
        worker.close()
    assert [a["status"] for a in answers] == [200, 400, 200] and "divide by 255" in answers[1]["body"].decode()
    assert answers[0]["headers"]["content-type"] == "application/octet-stream"
    assert answers[1]["headers"]["content-type"] == answers[2]["headers"]["content-type"] == "application/json"
    reference = network_on_cpu("mnistnet", weights / "mnistnet.pt")
    with torch.no_grad():
        expected = torch.softmax(reference(normalize_images(images[:3]).reshape(3, -1)), dim=1).numpy()
    outputs = gpu_check.outputs_of(parse_binary_v2_response(
        answers[0]["body"], answers[0]["headers"]["Inference-Header-Content-Length"]))
    np.testing.assert_allclose(outputs["probabilities"], expected, atol=1e-6)
    assert outputs["predicted_class"].tolist() == expected.argmax(axis=1).tolist()
    assert json.loads(answers[2]["body"])["predicted_class"] == int(expected[1].argmax())


def test_the_worker_serves_a_tabular_model(tmp_path):
    weights = seeded_weights(tmp_path / "w", ["mlp"])
    spec = get_spec("mlp")
    worker = inprocess.Worker("mlp", weights / "mlp.pt", tmp_path / "root", "cpu")
    try:
        wire, datatype, x, labels = gpu_check.check_inputs(spec)
        assert datatype == "FP32" and wire.shape == (gpu_check.TABULAR_ROWS, 2) and labels is None
        answers = [worker.infer(part, datatype) for part in gpu_check.chunks(wire)]
    finally:
        worker.close()
    statuses = [s for s, _ in answers]
    assert statuses == [200] * (gpu_check.TABULAR_ROWS // gpu_check.CHUNK)
    result = gpu_check.compare(spec, statuses, [r for _, r in answers],
                               gpu_check.reference_outputs(spec, weights / "mlp.pt", x))
    assert result["status"] == "PASS" and result["max_abs_diff"] < 1e-6 and result["class_mismatches"] == 0


# --------------------------------------------------------------------------- parity and throughput


@pytest.mark.parametrize("name", ["mnistnet", "regressionnet"])
def test_parity_passes_for_the_same_network_and_catches_a_different_one(name, tmp_path, digits):
    spec = get_spec(name)
    weights = seeded_weights(tmp_path / "w", [name])
    other = seeded_weights(tmp_path / "other", [name], seed=99)
    worker = inprocess.Worker(name, weights / f"{name}.pt", tmp_path / "root", "cpu")
    try:
        wire, datatype, x, labels = gpu_check.check_inputs(spec, digits)
        answers = [worker.infer(part, datatype) for part in gpu_check.chunks(wire)]
    finally:
        worker.close()
    statuses, responses = [s for s, _ in answers], [r for _, r in answers]

    same = gpu_check.compare(spec, statuses, responses, gpu_check.reference_outputs(spec, weights / f"{name}.pt", x), labels)
    assert same["status"] == "PASS", same
    assert same["samples"] == len(wire) and same["max_abs_diff"] < 1e-5
    if spec.is_image_model:
        assert same["class_mismatches"] == 0 and same["accuracy"] == same["reference_accuracy"]

    different = gpu_check.compare(spec, statuses, responses, gpu_check.reference_outputs(spec, other / f"{name}.pt", x), labels)
    assert different["status"] == "FAIL" and "EXCEEDS" in different["detail"]

    failed = gpu_check.compare(spec, [200, 503], responses[:2], {"x": None})
    assert failed["status"] == "FAIL" and "1 of 2 requests answered [503]" in failed["detail"]


def test_worker_throughput_on_the_cpu(tmp_path, digits):
    weights = seeded_weights(tmp_path / "w", ["mnistnet"])
    worker = inprocess.Worker("mnistnet", weights / "mnistnet.pt", tmp_path / "root", "cpu")
    try:
        for batch in (1, 256):
            result = inprocess.measure(worker, digits[0][:batch], seconds=0.1, device="cpu", warmup=0.02)
            assert result["batch"] == batch and result["calls"] >= 1 and result["seconds"] >= 0.1
            assert result["samples_per_s"] == pytest.approx(result["calls"] * batch / result["seconds"], rel=0.01)
        short = digits[0][:1].reshape(1, -1)[:, :783]  # 783 pixels: the handler refuses it
        with pytest.raises(RuntimeError, match="the handler answered 400"):
            inprocess.measure(worker, short, seconds=0.1, device="cpu")
    finally:
        worker.close()


# ------------------------------------------------------------------------------------------ main


def test_dry_run_on_the_cpu_passes_every_in_process_check(tmp_path, capsys):
    names = ["mnistnet", "mlp", "regressionnet"]
    weights = seeded_weights(tmp_path / "w", names)
    code, summary = run_summary(["--device", "cpu", "--no-server", "--models", ",".join(names), "--seconds", "0.1",
                                 "--weights", str(weights), "--out", str(tmp_path / "gpu.json")])
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
    assert "TorchServe 0.12.0's Service" in out
    assert "PASS parity[mnistnet]: TorchServe's Service on cpu vs the network on the CPU: 10000 test digits" in out
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


def test_a_missing_torchserve_package_fails_the_in_process_part_naming_the_wheel(tmp_path, monkeypatch, capsys):
    """Where a package the in-process part needs is missing, the check fails and says what to carry."""
    weights = seeded_weights(tmp_path / "w", ["mlp"])
    monkeypatch.setattr(inprocess, "NEEDS", (*inprocess.NEEDS, ("no_such_module_for_gpu_check", "no-such-wheel")))
    code, summary = run_summary(["--device", "cpu", "--no-server", "--models", "mlp", "--seconds", "0.05",
                                 "--weights", str(weights), "--out", str(tmp_path / "gpu.json")])
    assert code == 1 and summary["counts"] == {"PASS": 0, "FAIL": 1, "SKIP": 1}
    (failed,) = [c for c in summary["checks"] if c["status"] == "FAIL"]
    assert failed["name"] == "in-process" and "carry the no-such-wheel wheel" in failed["detail"]


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
    assert served.worker_devices(tmp_path) == {"mnistnet": ["cuda:0", "cuda:0"], "mlp": ["cpu"]}


class _StandIn(BaseHTTPRequestHandler):
    """POST /v2/models/<m>/infer answered by the in-process worker (TorchServe's Service), as TorchServe would."""

    protocol_version = "HTTP/1.1"
    worker = None
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            (answer,) = self.worker.send([(body, dict(self.headers.items()))])
        self.send_response(answer["status"])
        for key, value in answer["headers"].items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer["body"])))
        self.end_headers()
        self.wfile.write(answer["body"])

    def log_message(self, *args):
        pass


def test_served_parity_and_load_against_a_stand_in_server(tmp_path, digits):
    """The served part's parity (through the project's client) and bench/loadgen.py's Python generator."""
    weights = seeded_weights(tmp_path / "w", ["mnistnet"])
    _StandIn.worker = inprocess.Worker("mnistnet", weights / "mnistnet.pt", tmp_path / "root", "cpu")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        report = gpu_check.Report()
        client = TorchServeClient(url, token="unused", retries=0)
        check = gpu_check.parity_check(report, "mnistnet", "served-parity", "stand-in",
                                       served.answer_with(client, "mnistnet"), weights / "mnistnet.pt", digits)
        assert check["status"] == "PASS" and check["samples"] == len(digits[0]), check
        assert check["class_mismatches"] == 0 and check["max_abs_diff"] < 1e-5

        from client.oip import binary_v2_request

        body, length = binary_v2_request(digits[0][:16], datatype="UINT8")
        load = run_threads(f"{url}/v2/models/mnistnet/infer", body, "application/octet-stream", connections=4,
                           seconds=0.5, headers={"Inference-Header-Content-Length": str(length)}, warmup_s=0.1)
        assert load["requests"] > 0 and load["errors"] == 0
        assert load["req_per_s"] == pytest.approx(load["requests"] / 0.5)
        assert 0 < load["p50_ms"] <= load["p90_ms"] <= load["p99_ms"] <= load["max_ms"]

        bad = run_threads(f"{url}/v2/models/mnistnet/infer", b'{"inputs": []}', "application/octet-stream",
                          connections=2, seconds=0.2, headers={"Inference-Header-Content-Length": "14"}, warmup_s=0.0)
        assert bad["errors"] > 0 and bad["errors"] == bad["requests"] and bad["p50_ms"] is None
    finally:
        server.shutdown()
        server.server_close()
        _StandIn.worker.close()


@pytest.mark.e2e
@pytest.mark.slow
def test_served_checks_against_a_real_torchserve(tmp_path, capsys):
    """The served path on the CPU: archives, TorchServe, workers' device from model_log.log, parity, load."""
    reason = served.unavailable()
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
    served_load = [c for c in summary["checks"] if c["name"].startswith("throughput[served")]
    assert [(c["connections"], c["images_per_request"]) for c in served_load] == served.SERVED_LOAD
    assert all(c["status"] == "PASS" and c["requests"] > 0 and c["errors"] == 0 for c in served_load)
    workers = next(c for c in summary["checks"] if c["name"] == "workers")
    assert workers["logged"] == {"mnistnet": ["cpu", "cpu"], "mlp": ["cpu"]}
