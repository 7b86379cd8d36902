"""The benchmark's peers: Triton answers like ours (both checked against the in-process model), the Triton
venv's setup fails loudly, and the gRPC load generator measures its own ceiling against a null server."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from bench import grpcload, triton_server
from ci_skips import ci_enabled
from bench.sweep import digits, reference, served
from paths import REPO_ROOT

TOLERANCE = 1e-5


def _answers(server, images: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """probabilities and predicted classes for ``images`` over REST (binary) and gRPC, stock clients."""
    token = server.keys().get("inference")
    out = {}
    rest = thttp.InferenceServerClient(server.inference_url.removeprefix("http://"))
    tensor = thttp.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=True)
    result = rest.infer("mnistnet", [tensor], headers={"Authorization": f"Bearer {token}"} if token else None)
    out["rest"] = result.as_numpy("probabilities"), result.as_numpy("predicted_class").reshape(-1)
    grpc = tgrpc.InferenceServerClient(server.grpc_address)
    tensor = tgrpc.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = grpc.infer("mnistnet", [tensor], headers={"authorization": f"Bearer {token}"} if token else None)
    out["grpc"] = result.as_numpy("probabilities"), result.as_numpy("predicted_class").reshape(-1)
    return out


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(not triton_server.venv_ready() and not ci_enabled(),
                    reason="build/triton-venv is not made yet (`python -m bench.triton_server --setup`; make bench makes "
                    "it; under CI this test makes it)")
def test_triton_answers_equal_ours_and_the_model(weights_dir):
    triton_server.ensure_venv()  # under CI: made here (~3 min once), and a failed setup fails the test
    images = digits(64)
    expected = reference(images, weights_dir / "mnistnet.pt")
    answers = {}
    for side in ("triton", "ours"):
        with served(side, weights_dir) as server:
            answers[side] = _answers(server, images)
    for side, by_protocol in answers.items():
        for protocol, (probabilities, classes) in by_protocol.items():
            assert probabilities.shape == (64, 10), (side, protocol)
            np.testing.assert_allclose(probabilities, expected, atol=TOLERANCE, err_msg=f"{side} {protocol}")
            assert classes.tolist() == expected.argmax(axis=1).tolist(), (side, protocol)
    np.testing.assert_allclose(answers["triton"]["rest"][0], answers["ours"]["rest"][0], atol=TOLERANCE)


def test_triton_setup_fails_saying_why(tmp_path, monkeypatch):
    missing = tmp_path / "no-python3.11"
    monkeypatch.setattr(triton_server, "BASE_PYTHON", missing)
    monkeypatch.setattr(triton_server, "VENV", tmp_path / "venv")
    monkeypatch.setattr(triton_server, "STAMP", tmp_path / "venv" / ".installed")
    with pytest.raises(triton_server.TritonSetupError, match="python3.11"):
        triton_server.ensure_venv(quiet=True)
    assert not (tmp_path / "venv").exists()


def test_benchmark_asked_for_triton_stops_when_setup_fails(tmp_path):
    """bench.serving with the Triton peer and no way to make its venv: exit 1 naming the cause, nothing measured."""
    code = (
        "import sys, pathlib; from bench import triton_server as t; "
        f"t.BASE_PYTHON = pathlib.Path({str(tmp_path / 'none')!r}); t.VENV = pathlib.Path({str(tmp_path / 'v')!r}); "
        "t.STAMP = t.VENV / '.installed'; from bench import serving; "
        "sys.exit(serving.main(['--baselines', 'triton', '--skip-ours', '--models', 'mnistnet']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Triton peer was asked for" in proc.stderr and "python3.11" in proc.stderr
    assert "in-process limit" not in proc.stdout


def test_grpc_generator_ceiling_against_the_null_server():
    with grpcload.NullServer() as server:
        result = grpcload.run(server.grpc_address, in_flight=4, seconds=1.0, warmup=0.2)
    assert result["errors"] == 0 and result["calls"] > 10
    assert result["calls_per_s"] == pytest.approx(result["calls"] / result["seconds"])
    assert 0 < result["generator_cpu_us_per_call"] < 1e5
    assert grpcload.predicted_classes(result["first"]).tolist() == [0]  # the null server's fixed answer


def test_grpc_request_carries_the_images_as_one_fp32_blob():
    images = digits(3)
    request = grpcload.infer_request(images)
    assert list(request.inputs[0].shape) == [3, 784] and request.inputs[0].datatype == "FP32"
    assert np.array_equal(np.frombuffer(request.raw_input_contents[0], "<f4").reshape(3, 784), images)
    assert [o.name for o in request.outputs] == ["probabilities", "predicted_class"]


def test_generator_refuses_non_loopback_targets():
    with pytest.raises(ValueError, match="loopback"):
        grpcload.run("10.0.0.1:8001", seconds=0.1)


def test_tuned_stock_runs_with_its_fastest_settings(tmp_path):
    from bench.servers import STOCK_FAST_SETTINGS, baseline_server
    from serve.server import load_properties

    (tmp_path / "store").mkdir()
    server = baseline_server(tmp_path, tmp_path / "store", settings=STOCK_FAST_SETTINGS)
    props = load_properties(server.config)
    assert props["metrics_mode"] == "prometheus" and props["disable_token_authorization"] == "true"
    untuned = load_properties(baseline_server(tmp_path, tmp_path / "store").config)
    assert "metrics_mode" not in untuned and "disable_token_authorization" not in untuned
