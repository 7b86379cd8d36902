"""The CPU serving image, built from the Dockerfile and run as a real container (podman or docker).

Once per session (the ``engine`` and ``image`` fixtures, tests/container/conftest.py): bring weights/ and
model_store/ up to date on the host (what `make package` does; the image's builder stage then reuses them),
build ``torchserve-mnist:cpu`` (tests/container/container_image.py). Once per module: start it as the Kubernetes Deployment does (read-only root, tmpfs /tmp and workdir) with its inference and
gRPC ports published on private loopback ports, and wait until every model is READY.
Then: every model READY, real predictions with the token read out of the container, the Open Inference
Protocol REST surface and OIP gRPC (in the JVM) with the stock tritonclient, the non-root user, the size,
and last a clean stop (SIGTERM → exit 0). The build and cold-start times are printed (``-s`` shows them).

Without an engine these tests skip, except under CI (``CI=true``), where they fail: CI must prove the image.
"""
from __future__ import annotations

import gzip
import json
import time

import numpy as np
import pytest
import requests

from dockerfile_support import dockerfile_instructions

from models.registry import REGISTRY, get_spec
from paths import REPO_ROOT
from serve.package import package_models
from servers import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_SIZE = 1.5e9          # issue 15: the CPU image stays under 1.5 GB
READY_TIMEOUT_S = 600
STOP_TIMEOUT_S = 60       # the entrypoint gives TorchServe up to 60 s; podman stop -t matches it
MNIST = REPO_ROOT / "data" / "mnist" / "MNIST" / "raw"
DIGITS = 20


def mnist_test_digits(count: int = DIGITS) -> tuple[np.ndarray, list[int]]:
    """The first ``count`` MNIST test images as float32 rows in [0, 1], and their labels."""
    with gzip.open(MNIST / "t10k-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read()[16:16 + count * 784], dtype=np.uint8)
    with gzip.open(MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = list(f.read()[8:8 + count])
    return (pixels.astype(np.float32) / 255.0).reshape(count, 784), labels


class Container:
    """One running container of the image: engine, id, published ports, the inference key."""

    def __init__(self, engine, cid: str, http_port: int, grpc_port: int):
        self.engine, self.cid, self.http_port, self.grpc_port = engine, cid, http_port, grpc_port
        self.key: str | None = None
        self.timings: dict[str, float] = {}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def exec(self, *args: str, check: bool = True):
        return self.engine("exec", self.cid, *args, check=check, timeout=60)

    def running(self) -> bool:
        return self.engine("inspect", "--format", "{{.State.Running}}", self.cid).stdout.strip() == "true"

    def logs(self) -> str:
        result = self.engine("logs", "--tail", "60", self.cid, check=False)
        return result.stdout + result.stderr


def wait_until_ready(box: Container, started: float) -> None:
    """Poll until every model is READY (the image's own health command); records cold-start timings:
    container start → first model answering a real prediction, → every model READY."""
    deadline = started + READY_TIMEOUT_S
    rows, _ = mnist_test_digits(1)
    while time.monotonic() < deadline:
        assert box.running(), f"the container exited while starting:\n{box.logs()}"
        if box.key is None:
            key = box.exec("python3", "/app/docker/tsctl.py", "key", check=False)
            box.key = key.stdout.strip() if key.returncode == 0 and key.stdout.strip() else None
        if box.key and "first_answer_s" not in box.timings:
            try:
                answer = requests.post(box.url("/predictions/mnistnet"), json={"data": rows[0].tolist()},
                                       headers=box.auth(), timeout=5)
                if answer.status_code == 200:
                    box.timings["first_answer_s"] = time.monotonic() - started
            except requests.RequestException:
                pass
        if box.key and "all_ready_s" not in box.timings and \
                box.exec("python3", "/app/docker/tsctl.py", "health", check=False).returncode == 0:
            box.timings["all_ready_s"] = time.monotonic() - started
        if len(box.timings) == 2:
            return
        time.sleep(0.5)
    pytest.fail(f"not every model READY after {READY_TIMEOUT_S} s:\n{box.logs()}")


def run_container(engine, image) -> Container:
    """Start a container of ``image`` and wait until every model is READY (the caller removes it:
    ``engine("rm", "-f", "-t", "0", box.cid)``, also when this raises: ``box.cid`` is set first)."""
    http_port, grpc_port = free_port(), free_port()
    started = time.monotonic()
    # As the Kubernetes Deployment runs it: read-only root, writable tmpfs /tmp and workdir (podman 4 ignores
    # a tmpfs mode=, its U option chowns the tmpfs to the container's user instead).
    home = "rw,U" if engine.exe == "podman" else "rw,mode=1777"
    cid = engine("run", "-d", "-p", f"127.0.0.1:{http_port}:8080", "-p", f"127.0.0.1:{grpc_port}:7070",
                 "--read-only", "--tmpfs", "/tmp:rw,mode=1777", "--tmpfs", f"/home/model-server:{home}",
                 image).stdout.strip()
    box = Container(engine, cid, http_port, grpc_port)
    try:
        wait_until_ready(box, started)
    except BaseException:
        engine("rm", "-f", "-t", "0", cid, check=False)
        raise
    print(f"\n[container] cold start: first prediction after {box.timings['first_answer_s']:.1f} s, "
          f"all {len(REGISTRY)} models READY after {box.timings['all_ready_s']:.1f} s")
    return box


@pytest.fixture(scope="module")
def box(engine, image):
    """A running container of the image, every model READY; removed at the end of the module."""
    box = run_container(engine, image)
    try:
        yield box
    finally:
        engine("rm", "-f", "-t", "0", box.cid, check=False)


def test_image_is_small_non_root_and_healthchecked(engine, image):
    config = json.loads(engine("image", "inspect", image).stdout)[0]
    size = int(engine("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    assert size <= MAX_SIZE, f"the CPU image is {size / 1e9:.2f} GB (> {MAX_SIZE / 1e9} GB): what got in?"
    assert config["Config"]["User"] == "10001:10001"
    healthcheck = config.get("Healthcheck") or config["Config"].get("Healthcheck")  # podman | docker
    assert healthcheck and "tsctl.py" in " ".join(healthcheck["Test"]), "no HEALTHCHECK: built without --format docker?"
    print(f"\n[container] {image}: {size / 1e9:.2f} GB")


def test_server_runs_as_the_image_user_on_cpu_torch(box):
    assert box.exec("id", "-u").stdout.strip() == "10001"
    processes = box.exec("ps", "-eo", "user:12,args", check=False)
    if processes.returncode == 0:  # procps may be absent from a slim image: id -u above still holds
        assert "root" not in [line.split()[0] for line in processes.stdout.splitlines()[1:] if "java" in line]
    spec = next(args.split("=", 1)[1] for ins, args in dockerfile_instructions()
                if ins == "ARG" and args.startswith("TORCH_SPEC="))
    torch_build = box.exec("python", "-c", "import torch; print(torch.__version__, torch.version.cuda)")
    assert torch_build.stdout.split() == [spec.split("==")[1], "None"], f"{spec}: {torch_build.stdout}"


def test_healthcheck_is_healthy_and_every_model_ready(box):
    if box.engine.exe == "podman":
        result = box.engine("healthcheck", "run", box.cid, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    health = box.exec("python3", "/app/docker/tsctl.py", "health")
    assert f"{len(REGISTRY)} models" in health.stdout, health.stdout
    for name in REGISTRY:
        assert requests.get(box.url(f"/v2/models/{name}/ready"), headers=box.auth(), timeout=10).status_code == 200


def test_prediction_needs_the_token_and_is_correct(box):
    rows, labels = mnist_test_digits()
    refused = requests.post(box.url("/predictions/mnistnet"), json={"data": rows[0].tolist()}, timeout=30)
    assert refused.status_code in (400, 401), f"a request without the key was served: {refused.status_code}"
    png = (REPO_ROOT / "examples" / "digit_7.png").read_bytes()
    answer = requests.post(box.url("/predictions/mnistnet"), data=png, headers={**box.auth(), "Content-Type": "image/png"},
                           timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predicted_class"] == 7, answer.json()
    many = requests.post(box.url("/predictions/mnistnet"), json={"data": rows.tolist()}, headers=box.auth(), timeout=60)
    assert many.status_code == 200, many.text
    predicted = [a["predicted_class"] for a in many.json()]
    assert sum(p == t for p, t in zip(predicted, labels)) >= DIGITS - 1, (labels, predicted)


def test_oip_rest_surface(box):
    rows, labels = mnist_test_digits()
    server = requests.get(box.url("/v2"), headers=box.auth(), timeout=10)
    assert server.status_code == 200 and "binary_tensor_data" in server.json().get("extensions", []), server.text
    assert requests.get(box.url("/v2/health/ready"), headers=box.auth(), timeout=10).status_code == 200
    for name in REGISTRY:
        metadata = requests.get(box.url(f"/v2/models/{name}"), headers=box.auth(), timeout=10)
        assert metadata.status_code == 200, metadata.text
        expected = get_spec(name).oip_metadata()
        assert (metadata.json()["inputs"], metadata.json()["outputs"]) == (expected["inputs"], expected["outputs"])
    body = {"id": "container-1", "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                             "data": rows.ravel().tolist()}]}
    answer = requests.post(box.url("/v2/models/mnistnet/infer"), json=body, headers=box.auth(), timeout=60)
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    predicted = outputs["predicted_class"]["data"]
    assert outputs["predicted_class"]["shape"] == [DIGITS]
    assert sum(p == t for p, t in zip(predicted, labels)) >= DIGITS - 1, (labels, predicted)
    bad = requests.post(box.url("/v2/models/mnistnet/infer"), json={"inputs": []}, headers=box.auth(), timeout=30)
    assert 400 <= bad.status_code < 500 and "error" in bad.json(), bad.text


def test_oip_grpc_front_with_tritonclient(box):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    rows, labels = mnist_test_digits()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{box.grpc_port}")
    headers = {"authorization": f"Bearer {box.key}"}
    try:
        assert client.is_server_ready(headers=headers)
        for name in REGISTRY:
            assert client.is_model_ready(name, headers=headers), name
        tensor = grpcclient.InferInput("input", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        result = client.infer("mnistnet", [tensor], headers=headers)
        predicted = result.as_numpy("predicted_class").tolist()
        assert sum(p == t for p, t in zip(predicted, labels)) >= DIGITS - 1, (labels, predicted)
        with pytest.raises(InferenceServerException):
            client.infer("mnistnet", [tensor])  # no key: refused
    finally:
        client.close()


class NativeLoad:
    """``connections`` threads of unversioned ``/predictions/mnistnet`` requests to a container; each answer
    recorded as (start, end, X-Model-Version, sample, probabilities), anything but a 200 as a failure."""

    def __init__(self, box: Container, rows: np.ndarray, connections: int = 4):
        import threading

        self.box, self.rows = box, rows
        self.answers: list[tuple] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i, connections), daemon=True)
                        for i in range(connections)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, index: int, step: int) -> None:
        session, n = requests.Session(), index
        while not self.stop.is_set():
            sample, n = n % len(self.rows), n + step
            start = time.monotonic()
            try:
                answer = session.post(self.box.url("/predictions/mnistnet"), json={"data": self.rows[sample].tolist()},
                                      headers=self.box.auth(), timeout=30)
                if answer.status_code != 200:
                    self.failures.append(f"{answer.status_code} {answer.text[:200]}")
                    continue
                self.answers.append((start, time.monotonic(), answer.headers.get("X-Model-Version"), sample,
                                     np.asarray(answer.json()["probabilities"]).reshape(-1)))
            except Exception as exc:  # a reset connection counts as a failure
                self.failures.append(repr(exc)[:200])


def test_rollout_and_rollback_in_a_running_container(engine, image, tmp_path):
    """A container serving a mounted model store (the image's mnistnet.mar and a retrained 2.0):
    `<engine> exec -w /app <ctr> python -m serve rollout mnistnet 2.0` under 4 connections of load answers every
    request (0 failures), each from the version it names (checked against the in-process model), 2.0 once the
    command returned; the recorded default survives a container restart; `rollback` brings 1.0 back the same way."""
    import shutil

    import torch

    from train.__main__ import main as train_main

    weights, store = tmp_path / "weights", tmp_path / "store"
    weights.mkdir()
    store.mkdir()
    shutil.copy2(REPO_ROOT / "weights" / "mnistnet.pt", weights / "mnistnet.pt")
    assert train_main(["mnistnet", "--version", "2.0", "--epochs", "1", "--limit", "3000", "--seed", "1",
                       "--output-dir", str(weights), "--no-progress"]) == 0
    shutil.copy2(REPO_ROOT / "model_store" / "mnistnet.mar", store / "mnistnet.mar")  # the image's own 1.0
    package_models(["mnistnet"], weights, store, version="2.0")
    store.chmod(0o777)  # the image's user (uid 10001) records the default in <store>/.rollout/
    for archive in store.iterdir():
        archive.chmod(0o644)

    spec, models = get_spec("mnistnet"), {}
    for version in ("1.0", "2.0"):
        model = spec.at_version(version).build()
        model.load_state_dict(torch.load(weights / f"{spec.at_version(version).artifact_stem}.pt", weights_only=True))
        models[version] = model.eval()
    rows, _ = mnist_test_digits(DIGITS)

    def check(load: NativeLoad) -> dict[str, int]:
        assert load.failures == [], load.failures[:5]
        counts: dict[str, int] = {}
        mean, std = spec.normalize
        for _start, _end, version, sample, probabilities in load.answers:
            with torch.no_grad():
                expected = torch.softmax(models[version](torch.as_tensor((rows[sample:sample + 1] - mean) / std)
                                                         .reshape(1, *spec.input_shape)), dim=1)[0].numpy()
            np.testing.assert_allclose(probabilities, expected, atol=1e-4, err_msg=version)
            counts[version] = counts.get(version, 0) + 1
        return counts

    def serve(*args: str) -> dict:
        result = engine("exec", "-w", "/app", cid, "python", "-m", "serve", *args, timeout=300, check=False)
        assert result.returncode == 0, (result.stdout[-2000:] + result.stderr[-3000:]
                                        + engine("logs", "--tail", "40", cid, check=False).stdout[-4000:])
        return json.loads(result.stdout)

    def recorded() -> dict:
        return json.loads((store / ".rollout" / "defaults.json").read_text())["models"]["mnistnet"]

    http_port = free_port()
    started = time.monotonic()
    cid = engine("run", "-d", "-p", f"127.0.0.1:{http_port}:8080", "-e", "OIP_GRPC_LISTEN=off",
                 "-v", f"{store}:/app/model_store", image).stdout.strip()
    try:
        box = Container(engine, cid, http_port, 0)
        wait_until_ready(box, started)
        with NativeLoad(box, rows) as load:
            report = serve("rollout", "mnistnet", "2.0", "--gate-samples", "500", "--margin", "0.5")
            promoted = time.monotonic()
            time.sleep(1.0)
        assert report["passed"] and report["drained"], report
        counts = check(load)
        assert counts.get("1.0", 0) > 0 and counts.get("2.0", 0) > 0, counts
        assert {a[2] for a in load.answers if a[0] > promoted} == {"2.0"}
        assert recorded() == {"default": "2.0", "archive": "mnistnet-v2.0.mar", "history": ["1.0", "2.0"]}
        status = engine("exec", "-w", "/app", cid, "python", "-m", "serve", "status", check=False).stdout
        assert "TorchServe is running" in status and "mnistnet         v2.0 (default)" in status, status
        assert "recorded default v2.0 (mnistnet-v2.0.mar; history 1.0 -> 2.0)" in status, status

        engine("restart", "-t", str(STOP_TIMEOUT_S), cid, timeout=STOP_TIMEOUT_S + 60)
        box = Container(engine, cid, http_port, 0)  # a new key: TorchServe writes key_file.json at each start
        wait_until_ready(box, time.monotonic())
        with NativeLoad(box, rows) as load:
            time.sleep(1.0)
            assert {a[2] for a in load.answers} == {"2.0"}, "the restart did not serve the promoted default"
            back = serve("rollback", "mnistnet")
            rolled_back = time.monotonic()
            time.sleep(1.0)
        assert back["from"] == "2.0" and back["to"] == "1.0" and back["drained"], back
        counts = check(load)
        assert {a[2] for a in load.answers if a[0] > rolled_back} == {"1.0"}, counts
        assert recorded() == {"default": "1.0", "archive": "mnistnet.mar", "history": ["1.0"]}
        print(f"\n[container] rollout under load: {report['seconds']} s (drain {report['drain_s']} s), "
              f"rollback after a restart: {back['seconds']} s; answers per version {counts}")
    finally:
        engine("rm", "-f", "-t", "0", cid, check=False)


def test_sigterm_stops_the_container_cleanly(box):
    """Last test of the module: `stop` sends SIGTERM; both servers stop and the container exits 0."""
    start = time.monotonic()
    box.engine("stop", "-t", str(STOP_TIMEOUT_S), box.cid, timeout=STOP_TIMEOUT_S + 30)
    took = time.monotonic() - start
    code = box.engine("inspect", "--format", "{{.State.ExitCode}}", box.cid).stdout.strip()
    logs = box.logs()
    assert code == "0", f"exit code {code}:\n{logs}"
    assert took < STOP_TIMEOUT_S, f"stop took {took:.0f} s: it was killed, not stopped"
    assert "servers stopped (status 0)" in logs, logs
    print(f"\n[container] stopped by SIGTERM in {took:.1f} s, exit 0")
