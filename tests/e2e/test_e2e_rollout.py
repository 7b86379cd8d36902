"""``python -m serve rollout|rollback`` against a real TorchServe serving mnistnet, under load.

The module's own server (versions come and go, so not the session's) serves mnistnet 1.0 (the trained weights).
Version 2.0 is a real retrain (1 epoch on 3000 images, ``python -m train --version 2.0``); 3.0 is deliberately
bad (1.0's weights with the output layer's rows rotated, so it says the wrong digit); 4.0's archive is garbage;
5.0's weights are another network's, so its workers cannot load.
Every served answer is checked against the in-process model of the version that says it answered.
The old version is retired only when the agent counts none of its requests in flight (slow explanations and big
batches addressed to it explicitly are all answered; --drain-timeout bounds that wait), and the promoted default is recorded in the store, so a
restart serves it (and a rollback after the restart goes back one step).
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import tritonclient.grpc as tritongrpc  # pinned in requirements-dev.txt: imported plainly, never skipped

from models.registry import get_spec
from serve.package import package_models
from serve.rollout import SECRET_FILE, Rollout, RolloutError, held_out
from serve.server import defaults_file
from paths import REPO_ROOT
from servers import clean_env, manage, post, start_ready_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "mnistnet"
SPEC = get_spec(MODEL)


@pytest.fixture(scope="module")
def versions(tmp_path_factory, weights_dir) -> tuple[Path, Path]:
    """``(weights, store)``: 1.0, a retrained 2.0 and a bad 3.0 built into a private store; 4.0 corrupt."""
    from train.__main__ import main as train_main

    root = tmp_path_factory.mktemp("rollout")
    weights, store = root / "weights", root / "store"
    weights.mkdir()
    shutil.copy2(weights_dir / f"{MODEL}.pt", weights / f"{MODEL}.pt")
    assert train_main([MODEL, "--version", "2.0", "--epochs", "1", "--limit", "3000", "--seed", "1",
                       "--output-dir", str(weights), "--no-progress"]) == 0
    state = torch.load(weights / f"{MODEL}.pt", weights_only=True)
    last = [k for k in state if k.endswith("weight")][-1]
    state[last] = torch.roll(state[last], 1, dims=0)  # output row c now scores class c+1
    state[last.replace("weight", "bias")] = torch.roll(state[last.replace("weight", "bias")], 1, dims=0)
    torch.save(state, weights / f"{MODEL}-v3.0.pt")
    torch.save(get_spec("feedforwardnet").build().state_dict(), weights / f"{MODEL}-v5.0.pt")  # cannot load
    package_models([MODEL], weights, store)
    for version in ("2.0", "3.0", "5.0"):
        package_models([MODEL], weights, store, version=version)
    (store / f"{MODEL}-v4.0.mar").write_bytes(b"PK\x03\x04 not really a zip")
    return weights, store


@pytest.fixture(scope="module")
def server(versions, tmp_path_factory):
    ts = start_ready_server(tmp_path_factory.mktemp("rollout-server"), versions[1], [MODEL])
    try:
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="module")
def reference(versions):
    """``reference(version, x)``: softmax probabilities of the in-process model with that version's weights."""
    models = {}

    def run(version: str, x: np.ndarray) -> np.ndarray:
        if version not in models:
            spec = SPEC.at_version(version)
            model = spec.build()
            model.load_state_dict(torch.load(versions[0] / f"{spec.artifact_stem}.pt", weights_only=True))
            models[version] = model.eval()
        mean, std = SPEC.normalize
        with torch.no_grad():
            return torch.softmax(models[version](torch.as_tensor((x - mean) / std)), dim=1).numpy()

    return run


@pytest.fixture
def rollout(server):
    runner = Rollout(server, log=lambda line: None, timeout=60.0)
    yield runner
    assert runner.default_version(MODEL) in ("1.0", "2.0")


def served(runner: Rollout) -> dict[str, str]:
    default = runner.default_version(MODEL)
    return {d["modelVersion"]: ("default" if d["modelVersion"] == default else "also") for d in runner.versions(MODEL)}


class Load:
    """16 connections: 6 on the native route, 6 on /v2/models/<m>/infer (binary OIP), 4 on OIP gRPC; each
    answer recorded as (route, start, end, version, probabilities of its sample) or as a failure."""

    def __init__(self, server, x: np.ndarray):
        self.server, self.x = server, x
        self.answers: list[tuple] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(route, i), daemon=True)
                        for i, route in enumerate(["native"] * 6 + ["oip"] * 6 + ["grpc"] * 4)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, route: str, index: int) -> None:
        key = self.server.keys()["inference"]
        session = requests.Session()
        grpc = tritongrpc.InferenceServerClient(url=self.server.grpc_address) if route == "grpc" else None
        n = index
        while not self.stop.is_set():
            sample = n % len(self.x)
            n += len(self.threads)
            start = time.monotonic()
            try:
                version, probabilities = getattr(self, route)(session, grpc, key, self.x[sample])
            except Exception as exc:  # every kind of failure counts
                self.failures.append(f"{route}: {exc!r}"[:300])
                continue
            self.answers.append((route, start, time.monotonic(), version, sample, probabilities))
        if grpc is not None:
            grpc.close()

    def native(self, session, _grpc, key, image):
        response = session.post(f"{self.server.inference_url}/predictions/{MODEL}", json={"data": image.tolist()},
                                headers={"Authorization": f"Bearer {key}"}, timeout=30)
        response.raise_for_status()
        return response.headers["X-Model-Version"], np.asarray(response.json()["probabilities"]).reshape(-1)

    def oip(self, session, _grpc, key, image):
        from client.api import binary_v2_request, parse_binary_v2_response

        body, length = binary_v2_request(image.reshape(1, -1))
        response = session.post(f"{self.server.inference_url}/v2/models/{MODEL}/infer", data=body, timeout=30,
                                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream",
                                         "Inference-Header-Content-Length": str(length)})
        response.raise_for_status()
        answer = parse_binary_v2_response(response.content, response.headers.get("Inference-Header-Content-Length"))
        assert response.headers["X-Model-Version"] == answer["model_version"]
        probabilities = next(o["data"] for o in answer["outputs"] if o["name"] == "probabilities")
        return answer["model_version"], np.asarray(probabilities).reshape(-1)

    def grpc(self, _session, grpc, key, image):
        tensor = tritongrpc.InferInput("input", [1, 784], "FP32")
        tensor.set_data_from_numpy(image.reshape(1, -1).astype(np.float32))
        result = grpc.infer(MODEL, [tensor], headers={"authorization": f"Bearer {key}"})
        return result.get_response().model_version, result.as_numpy("probabilities").reshape(-1)


def check_attribution(load: Load, reference, allowed: set[str]) -> dict[str, int]:
    """Every answer matches the in-process model of the version it names; returns answers per version."""
    assert load.failures == [], load.failures[:5]
    counts: dict[str, int] = {}
    for route, _start, _end, version, sample, probabilities in load.answers:
        assert version in allowed, (route, version)
        expected = reference(version, load.x[sample:sample + 1])[0]
        np.testing.assert_allclose(probabilities, expected, atol=1e-4, err_msg=f"{route} {version}")
        counts[version] = counts.get(version, 0) + 1
    return counts


def test_rollout_and_rollback_under_load_lose_nothing(server, rollout, reference):
    x, _ = held_out(SPEC, 64)
    assert served(rollout) == {"1.0": "default"}
    with Load(server, x) as load:
        report = rollout.rollout(MODEL, "2.0", gate_samples=1000, margin=0.5)
        promoted = time.monotonic()
        time.sleep(1.0)
        assert served(rollout) == {"2.0": "default"}
        back = rollout.rollback(MODEL)
        rolled_back = time.monotonic()
        time.sleep(1.0)
    assert report["passed"] and back == {**back, "from": "2.0", "to": "1.0"}
    assert served(rollout) == {"1.0": "default"}
    counts = check_attribution(load, reference, {"1.0", "2.0"})
    assert counts.get("1.0", 0) > 20 and counts.get("2.0", 0) > 20, counts
    assert {route for route, *_ in load.answers} == {"native", "oip", "grpc"}
    # Requests sent after a step returned are answered by its new default.
    assert {a[3] for a in load.answers if promoted + 0.1 < a[1] and a[2] < rolled_back - 3} <= {"2.0"}
    assert {a[3] for a in load.answers if a[1] > rolled_back + 0.1} == {"1.0"}
    # The archives stay in the store.
    assert (server.model_store / f"{MODEL}-v2.0.mar").is_file() and (server.model_store / f"{MODEL}.mar").is_file()


def test_the_gate_measures_through_the_served_path(server, rollout, reference):
    """The report's numbers equal the in-process models' on the same held-out samples; a bad version is
    refused, unregistered, and the default keeps serving under load."""
    x, y = held_out(SPEC, 500)
    with Load(server, x[:32]) as load:
        report = rollout.rollout(MODEL, "3.0", gate_samples=500)
    assert not report["passed"] and report["default"] == "1.0"
    assert served(rollout) == {"1.0": "default"}
    old, new = reference("1.0", x).argmax(1), reference("3.0", x).argmax(1)
    assert report["default_metric"] == pytest.approx(np.mean(old == y))
    assert report["candidate_metric"] == pytest.approx(np.mean(new == y))
    assert report["agreement"] == pytest.approx(np.mean(old == new))
    assert report["per_class"]["7"]["change"] == pytest.approx(np.mean(new[y == 7] == 7) - np.mean(old[y == 7] == 7),
                                                               abs=1e-4)
    assert json.loads(Path(report["report_file"]).read_text())["passed"] is False
    assert check_attribution(load, reference, {"1.0", "3.0"}).get("1.0", 0) > 0


@pytest.mark.parametrize("model, version, message", [
    ("resnet", "2.0", "unknown model 'resnet'"),
    ("mlp", "2.0", "model 'mlp' is not served by this server"),
    (MODEL, "1.0", "mnistnet version 1.0 is already served"),
    (MODEL, "9.0", "mnistnet-v9.0.mar does not exist; build it with `python -m serve.package --models mnistnet "
                   "--version 9.0`"),
    (MODEL, "4.0", "is not a readable model archive"),
    (MODEL, "../2", "bad version '../2'"),
    (MODEL, "5.0", "Failed to start workers for model mnistnet version: 5.0"),
])
def test_bad_rollouts_are_refused_and_the_default_keeps_serving(server, rollout, model, version, message):
    with pytest.raises(RolloutError, match=None) as refused:
        rollout.rollout(model, version)
    assert message in str(refused.value)
    assert served(rollout) == {"1.0": "default"}
    assert not (server.workdir / SECRET_FILE).exists()


def test_rollback_without_a_previous_version(server, rollout):
    with pytest.raises(RolloutError, match="mnistnet has no previous version to go back to"):
        rollout.rollback(MODEL)
    with pytest.raises(RolloutError, match="unknown model 'resnet'"):
        rollout.rollback("resnet")
    assert served(rollout) == {"1.0": "default"}


def test_two_rollouts_at_once(server, rollout):
    errors, reports = [], []

    def first():
        try:
            reports.append(Rollout(server, log=lambda line: None).rollout(MODEL, "3.0", gate_samples=500))
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    secret = server.workdir / SECRET_FILE
    deadline = time.monotonic() + 30
    while not secret.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RolloutError, match=r"another rollout or rollback is in progress on this server \(pid"):
        rollout.rollout(MODEL, "2.0")
    thread.join(60)
    assert not errors and reports and not reports[0]["passed"]
    assert served(rollout) == {"1.0": "default"}


def test_the_model_api_stays_closed_outside_a_rollout(server, versions):
    """TorchServe's own register/unregister still answer 405; the /rollout endpoint refuses everything
    without the current rollout's secret, and a path or URL as the archive even with it."""
    assert manage(server, "POST", f"/models?url={MODEL}-v2.0.mar").status_code == 405
    assert manage(server, "DELETE", f"/models/{MODEL}/1.0").status_code == 405
    params = {"op": "register", "model": MODEL, "version": "2.0", "archive": f"{MODEL}-v2.0.mar", "workers": "1"}
    refused = manage(server, "POST", "/rollout", params={**params, "secret": "x" * 43})
    assert refused.status_code == 403 and "no rollout is in progress" in refused.json()["message"]
    assert manage(server, "POST", "/rollout", key=None, params={**params, "secret": "x" * 43}).status_code == 400
    runner = Rollout(server)
    secret = runner._acquire()
    try:
        # A secret one character off (its last character can be "A" itself: token_urlsafe(32) ends in one of 16)
        off_by_one = secret[:-1] + ("B" if secret[-1] != "B" else "C")
        wrong = manage(server, "POST", "/rollout", params={**params, "secret": off_by_one})
        assert wrong.status_code == 403 and wrong.json()["message"] == "wrong rollout secret"
        for archive in ("../store/mnistnet-v2.0.mar", "file:///etc/passwd", "http://127.0.0.1:9/m.mar"):
            bad = manage(server, "POST", "/rollout", params={**params, "archive": archive, "secret": secret})
            assert bad.status_code == 400 and "bad archive" in bad.json()["message"]
        default = manage(server, "POST", "/rollout", params={"op": "unregister", "model": MODEL, "version": "1.0",
                                                              "secret": secret})
        assert default.status_code == 409 and "default" in default.json()["message"]
    finally:
        runner._release()
    assert served(runner) == {"1.0": "default"}


def test_the_commands(server, rollout):
    """``python -m serve rollout|rollback|status`` as a user runs them: exit statuses, report, version list."""
    common = ["--config", str(server.workdir / "ts-config.properties"), "--workdir", str(server.workdir),
              "--tmpdir", str(server.tmpdir)]

    def run(*args):
        return subprocess.run([sys.executable, "-m", "serve", *args, *common], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=300, env=clean_env())

    refused = run("rollout", MODEL, "3.0", "--gate-samples", "300", "--report", str(server.workdir / "r.json"))
    assert refused.returncode == 4, refused.stdout + refused.stderr
    report = json.loads((server.workdir / "r.json").read_text())
    assert report["passed"] is False and json.loads(refused.stdout)["candidate_metric"] == report["candidate_metric"]
    assert len(report["per_class"]) == 10 and "gate refused mnistnet 3.0" in refused.stderr
    back = run("rollback", MODEL)
    assert back.returncode == 1 and "error: mnistnet has no previous version to go back to" in back.stderr
    unknown = run("rollout", "resnet", "2.0")
    assert unknown.returncode == 1 and "unknown model 'resnet'" in unknown.stderr

    secret = rollout._acquire()  # hold the lock: the status shows both versions while 2.0 is registered
    try:
        rollout._register(secret, SPEC.at_version("2.0"), rollout.archive_of(SPEC.at_version("2.0")))
        status = run("status")
        assert f"{MODEL:16s} v1.0 (default)" in status.stdout and "v2.0 (also served)" in status.stdout, status.stdout
        assert status.stdout.count("READY pid") >= 2 * SPEC.workers
    finally:
        rollout._endpoint(secret, op="unregister", model=MODEL, version="2.0")
        rollout._release()
    assert served(rollout) == {"1.0": "default"}


class Pinned:
    """Slow requests addressed to one version explicitly, sent (2 connections each) until ``stop_sending`` is
    set: explanations of 32 digits with 256 integration steps (``/explanations/<m>/<v>``) and predictions of
    1024 digits (``/predictions/<m>/<v>``), each seconds of a worker's time on these 2 cores. Each answer:
    (kind, start, end, status, version, body)."""

    def __init__(self, server, version: str, x: np.ndarray, timeout: float = 120):
        self.server, self.version, self.x, self.timeout = server, version, x, timeout
        self.stop_sending = threading.Event()
        self.answers: list[tuple] = []
        self.threads = [threading.Thread(target=self._run, args=(kind,), daemon=True)
                        for kind in ("explanations", "explanations", "predictions", "predictions")]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_sending.set()
        for thread in self.threads:
            thread.join(120)

    def _run(self, kind: str) -> None:
        body = ({"data": self.x[:32].tolist(), "steps": 256} if kind == "explanations"
                else {"data": self.x[:1024].tolist()})
        while not self.stop_sending.is_set():
            start = time.monotonic()
            try:
                response = post(self.server, f"/{kind}/{MODEL}/{self.version}", json=body, timeout=self.timeout)
                answer = (response.status_code, response.headers.get("X-Model-Version"),
                          response.json() if response.status_code == 200 else response.text[:300])
            except Exception as exc:  # a reset connection counts as a failure
                answer = (None, None, repr(exc)[:300])
            self.answers.append((kind, start, time.monotonic(), *answer))


def test_the_old_version_answers_every_request_it_has_before_it_is_retired(server, rollout, reference):
    """Slow requests addressed to 1.0 explicitly, in flight when 2.0 becomes the default, all answer 200 from 1.0
    (checked against the in-process 1.0) under the 16-connection load: the retirement waits for the agent's
    in-flight count of 1.0 to reach 0, however long its last requests take."""
    x, _ = held_out(SPEC, 1024)
    promoted = threading.Event()

    def log(line: str) -> None:
        if "is the default now" in line:
            promoted.set()
            pinned.stop_sending.set()  # from now on nothing new is addressed to 1.0

    runner = Rollout(server, log=log, timeout=60.0)
    with Load(server, x[:64]) as load, Pinned(server, "1.0", x) as pinned:
        time.sleep(2.0)  # the pinned requests queue up on 1.0's workers
        report = runner.rollout(MODEL, "2.0", gate_samples=500, margin=0.5)
        retired = time.monotonic()
    assert promoted.is_set() and report["passed"] and report["drained"] is True, report
    assert served(runner) == {"2.0": "default"}
    failures = [a[:5] + (a[5],) for a in pinned.answers if a[3] != 200]
    assert failures == [], failures[:5]
    expected = reference("1.0", x)
    for kind, _start, _end, _status, version, body in pinned.answers:
        assert version == "1.0", (kind, version)
        assert len(body) == (32 if kind == "explanations" else 1024)
        probabilities = np.asarray([row["probabilities"] for row in body]).reshape(len(body), -1)
        np.testing.assert_allclose(probabilities, expected[:len(body)], atol=1e-4, err_msg=kind)
    # Requests were in flight on 1.0 at the promotion (the agent counted them), and every pinned one was answered
    # before 1.0 was unregistered.
    assert report["in_flight_at_drain_start"] > 0, report
    assert max(a[2] for a in pinned.answers) <= retired
    print(f"\n[rollout] pinned to 1.0: {len(pinned.answers)} answered, seconds each "
          f"{sorted(round(a[2] - a[1], 1) for a in pinned.answers)}; {report['in_flight_at_drain_start']} in flight "
          f"at the promotion, drained in {report['drain_s']} s")
    counts = check_attribution(load, reference, {"1.0", "2.0"})
    assert counts.get("1.0", 0) > 0 and counts.get("2.0", 0) > 0, counts
    back = rollout.rollback(MODEL)
    assert back["to"] == "1.0" and back["drained"] is True
    assert served(rollout) == {"1.0": "default"}


def test_the_drain_timeout_bounds_the_wait_and_says_so(server, reference):
    """With --drain-timeout shorter than the old version's requests, the rollout does not wait past it: it says so
    (log line, report ``drained: false`` and how many were left) and retires 1.0 anyway; 2.0 serves."""
    x, _ = held_out(SPEC, 1024)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if "is the default now" in line:
            pinned.stop_sending.set()

    runner = Rollout(server, log=log, timeout=60.0)
    with Pinned(server, "1.0", x, timeout=15) as pinned:
        time.sleep(2.0)
        report = runner.rollout(MODEL, "2.0", gate_samples=300, margin=0.5, drain_timeout=0.2)
    assert report["passed"] and report["drained"] is False and report["left_in_flight"] > 0, report
    assert report["drain_s"] < 2.0, report
    assert any("request(s) in flight after the drain timeout (0.2 s, --drain-timeout); retiring it anyway" in line
               for line in lines), lines
    assert served(runner) == {"2.0": "default"}
    runner.rollback(MODEL)
    assert served(runner) == {"1.0": "default"}


def answered_by(server, x: np.ndarray) -> tuple[set[str], np.ndarray]:
    """The versions that answer unversioned requests on the three routes (native, OIP REST, OIP gRPC), each
    and the native answer's probabilities."""
    from client.api import binary_v2_request, parse_binary_v2_response

    key = server.keys()["inference"]
    versions = set()
    native = post(server, f"/predictions/{MODEL}", json={"data": x.tolist()})
    assert native.status_code == 200, native.text
    versions.add(native.headers["X-Model-Version"])
    body, length = binary_v2_request(x)
    oip = requests.post(f"{server.inference_url}/v2/models/{MODEL}/infer", data=body, timeout=30,
                        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream",
                                 "Inference-Header-Content-Length": str(length)})
    assert oip.status_code == 200, oip.text
    versions.add(parse_binary_v2_response(oip.content, oip.headers.get("Inference-Header-Content-Length"))["model_version"])
    client = tritongrpc.InferenceServerClient(url=server.grpc_address)
    try:
        tensor = tritongrpc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x.astype(np.float32))
        versions.add(client.infer(MODEL, [tensor], headers={"authorization": f"Bearer {key}"}).get_response().model_version)
    finally:
        client.close()
    return versions, np.asarray([row["probabilities"] for row in native.json()]).reshape(len(x), -1)


def restart(server) -> None:
    server.stop()
    server.start()
    server.wait_ready(timeout=300, progress=False)


def test_the_promoted_default_survives_a_restart(server, rollout, reference):
    """rollout 2.0, stop, start: unversioned requests are answered by 2.0 (header, OIP model_version, gRPC);
    the record says why, `serve status` shows it; rollback after the restart, restart again: 1.0."""
    x, _ = held_out(SPEC, 8)
    x = x.reshape(len(x), -1)
    rollout.rollout(MODEL, "2.0", gate_samples=300, margin=0.5)
    record = json.loads(defaults_file(server.model_store).read_text())["models"][MODEL]
    assert record == {"default": "2.0", "archive": f"{MODEL}-v2.0.mar", "history": ["1.0", "2.0"]}
    restart(server)
    assert served(rollout) == {"2.0": "default"}
    versions, probabilities = answered_by(server, x)
    assert versions == {"2.0"}
    np.testing.assert_allclose(probabilities, reference("2.0", x), atol=1e-4)
    status = subprocess.run([sys.executable, "-m", "serve", "status", "--config", str(server.workdir / "ts-config.properties"),
                             "--workdir", str(server.workdir), "--tmpdir", str(server.tmpdir)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=clean_env())
    assert f"{MODEL:16s} v2.0 (default)" in status.stdout, status.stdout
    assert "recorded default v2.0 (mnistnet-v2.0.mar; history 1.0 -> 2.0): a restart serves it" in status.stdout

    back = rollout.rollback(MODEL)  # the history survived the restart
    assert back["from"] == "2.0" and back["to"] == "1.0"
    record = json.loads(defaults_file(server.model_store).read_text())["models"][MODEL]
    assert record == {"default": "1.0", "archive": f"{MODEL}.mar", "history": ["1.0"]}
    restart(server)
    assert served(rollout) == {"1.0": "default"}
    versions, probabilities = answered_by(server, x)
    assert versions == {"1.0"}
    np.testing.assert_allclose(probabilities, reference("1.0", x), atol=1e-4)
