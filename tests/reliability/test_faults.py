"""Fault matrix against real TorchServe servers: what a user gets for each fault, and what is (not) lost.

Cases (docs/reliability.md has the table these tests print at the end of the module):

1. overload: far more concurrent 256-image requests than ``job_queue_size`` holds → 200 or 503 with a
   JSON body, never a 500, a hang or a reset; the same workers serve normally right after; the project's
   client (bounded, jittered retries on 503/429) gets every answer through the same overload;
2. hung worker: a test-only handler that never returns (``fault_handler.py``, ``responseTimeout`` 3 s)
   → answered after the timeout with a JSON error, worker replaced (new pid, READY again), readiness
   probe non-200 meanwhile, the other model untouched; time to recovery measured;
3. dead JVM: ``python -m serve status`` says it died (stale pid) and exits non-zero, ``serve stop``
   cleans up; the container entrypoint exits non-zero when the JVM dies;
4. bad start: corrupt / truncated archive, missing or broken weights, port in use, unwritable log
   folder → ``python -m serve start`` fails fast with one line naming cause and fix, no stray process;
5. keys: rotated and expired inference keys get 400 InvalidKeyException; the client re-reads the key file;
6. workflow registration cannot load anything: outside the store, or a .war inside it.

One server (``fault_server``: mnistnet + faulty, ``job_queue_size`` small) serves cases 1, 2, 5 and 6;
a second, short-lived one (keys that expire in 3 s) serves the expiry and JVM-death cases.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import yaml

from client.api import TorchServeClient, TorchServeError
from paths import REPO_ROOT
from serve.server import Ports, Server, effective_config, load_properties, write_properties

from servers import clean_env, error_message, manage, send, worker_pids

from .support import JSON

pytestmark = [pytest.mark.e2e]

HERE = Path(__file__).resolve().parent
FAULT_MODELS = ("mnistnet", "faulty")
QUEUE = 2  # job_queue_size of the fault server: mnistnet holds one batch of 8 plus 2 queued requests
RESPONSE_TIMEOUT_S = 3  # the faulty model's responseTimeout
IMAGES_PER_REQUEST = 256
OVERLOAD_REQUESTS = 48
READY_TIMEOUT_S = 300


# ------------------------------------------------------------------------------------ the table


@pytest.fixture(scope="module")
def matrix(request, tmp_path_factory):
    """Rows ``case | what the user gets | what is lost | recovery``; printed (even without -s) and written
    to ``<basetemp>/fault-matrix.txt`` at the end of the module."""
    rows: list[str] = []
    yield rows
    text = "\n".join(["fault matrix (case | user gets | lost | recovery):", *rows])
    (tmp_path_factory.getbasetemp() / "fault-matrix.txt").write_text(text + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown with or without -s
            reporter.write_line("")
            for line in text.splitlines():
                reporter.write_line(line)


def record(matrix: list, case: str, gets: str, lost: str, recovery: str) -> None:
    row = f"{case:<26} | {gets} | lost: {lost} | recovery: {recovery}"
    matrix.append(row)
    print("\n" + row)


# ------------------------------------------------------------------------------------ archives


def write_fault_archive(path: Path, response_timeout: int = RESPONSE_TIMEOUT_S) -> Path:
    """``faulty.mar``: fault_handler.py and its model-config.yaml (one worker, batch 1), no weights."""
    manifest = {"createdOn": time.strftime("%d/%m/%Y %H:%M:%S"), "runtime": "python", "archiverVersion": "0.12.0",
                "model": {"modelName": "faulty", "handler": "fault_handler.py", "modelVersion": "1.0",
                          "configFile": "model-config.yaml"}}
    config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 1,
              "responseTimeout": response_timeout, "startupTimeout": 60}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest, indent=1))
        archive.writestr("model-config.yaml", yaml.safe_dump(config))
        archive.write(HERE / "fault_handler.py", "fault_handler.py")
    return path


def rewrite_archive(source: Path, target: Path, replace: dict[str, bytes | None]) -> Path:
    """A copy of ``source`` with the members in ``replace`` swapped for new bytes (None: left out)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            if info.filename in replace:
                if replace[info.filename] is not None:
                    new.writestr(info.filename, replace[info.filename])
            else:
                new.writestr(info, old.read(info.filename))
    return target


def server_config(path: Path, ports: Ports, store: Path, **settings: str) -> Path:
    """The repository's config.properties with these ports, this store and ``settings`` on top."""
    props = effective_config(load_properties(REPO_ROOT / "config.properties"), ports, store)
    props.update(settings)
    write_properties(props, path, "test config (tests/reliability/test_faults.py)")
    return path


def make_server(root: Path, store: Path, models, **settings: str) -> Server:
    """A Server whose config file names its ports, so ``python -m serve --config ...`` finds it too."""
    root.mkdir(parents=True, exist_ok=True)
    config = server_config(root / "config.properties", Ports.free(), store, **settings)
    (root / "control").mkdir(exist_ok=True)
    return Server(config=config, workdir=root / "work", log_dir=root / "logs", model_store=store,
                  models=list(models), env={"FAULT_CONTROL_DIR": str(root / "control")})


NOBODY = 65534  # the unprivileged user (Debian's ``nobody``/``nogroup``) the read-only-folder case runs as under root


def as_unprivileged() -> list[str]:
    """The command prefix that runs ``python -m serve`` without root's power over file permissions when the
    tests run as root (util-linux's setpriv), nothing for anyone else: root writes into a mode-0500 folder
    anyway. As ``nobody``; where nobody cannot run this interpreter or read the checkout (both under /root,
    say), as root without the capabilities that bypass permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "running a case as an unprivileged user under root needs setpriv (util-linux)"
    nobody = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run([*nobody, sys.executable, "-c", "import serve.server"], cwd=REPO_ROOT, capture_output=True,
                           timeout=120, env=clean_env())
    if probe.returncode == 0:
        return nobody
    return [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]


def serve_cli(*args: str, timeout: float = 120, unprivileged: bool = False) -> tuple[int, str, str, float]:
    """``python -m serve ARGS`` → (exit code, stdout, stderr, seconds); ``unprivileged``: under root, without
    root's power over file permissions (:func:`as_unprivileged`)."""
    prefix = as_unprivileged() if unprivileged else []
    started = time.monotonic()
    result = subprocess.run([*prefix, sys.executable, "-m", "serve", *args], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=timeout, env=clean_env())
    return result.returncode, result.stdout, result.stderr, time.monotonic() - started


def processes_mentioning(*needles: str) -> list[str]:
    """Live processes whose command line mentions any of ``needles`` (stray-process check)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            line = " ".join(process.info["cmdline"] or [])
            if process.info["status"] != psutil.STATUS_ZOMBIE and any(n in line for n in needles):
                found.append(f"{process.info['pid']}: {line[:160]}")
        except psutil.Error:
            pass
    return found


# ------------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def fault_store(store, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fault-store").resolve()
    shutil.copy2(store / "mnistnet.mar", directory / "mnistnet.mar")
    write_fault_archive(directory / "faulty.mar")
    return directory


@pytest.fixture(scope="module")
def fault_server(fault_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults").resolve()
    server = make_server(root, fault_store, FAULT_MODELS, job_queue_size=str(QUEUE))
    try:
        server.start()
        server.wait_ready(timeout=READY_TIMEOUT_S, progress=False)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def batch_body(digits) -> bytes:
    images, _ = digits
    return json.dumps({"data": (images[:IMAGES_PER_REQUEST] / 255.0).round(3).tolist()}).encode()


# ------------------------------------------------------------------------------------ 1. overload


def test_overload_answers_200_or_busy_and_keeps_the_workers(fault_server, batch_body, digits, matrix):
    server = fault_server
    before = worker_pids(server, FAULT_MODELS)
    _, labels = digits
    key = server.keys()["inference"]
    url = f"{server.inference_url}/predictions/mnistnet"

    def one(_):
        started = time.monotonic()
        try:
            response = requests.post(url, data=batch_body, timeout=120,
                                     headers={**JSON, "Authorization": f"Bearer {key}"})
            return response, time.monotonic() - started
        except requests.RequestException as err:
            return err, time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(OVERLOAD_REQUESTS) as pool:
        results = list(pool.map(one, range(OVERLOAD_REQUESTS)))
    burst_s = time.monotonic() - started
    errors = [r for r, _ in results if not isinstance(r, requests.Response)]
    assert not errors, f"connection errors / timeouts: {errors[:3]}"
    statuses = [r.status_code for r, _ in results]
    busy = [r for r, _ in results if r.status_code in (429, 503)]
    assert set(statuses) <= {200, 429, 503}, statuses
    assert busy, f"{OVERLOAD_REQUESTS} requests never overflowed a queue of {QUEUE}: {statuses}"
    assert statuses.count(200) >= 1
    for response in busy:
        body = response.json()
        assert body["code"] == response.status_code and body["type"] == "ServiceUnavailableException", body
        assert "mnistnet" in error_message(response)
    for response, _ in results:
        if response.status_code == 200:
            answer = response.json()
            assert len(answer) == IMAGES_PER_REQUEST
            accuracy = np.mean([a["predicted_class"] == y for a, y in zip(answer, labels)])
            assert accuracy > 0.95
    slowest_busy = max(s for r, s in results if r.status_code != 200)
    assert worker_pids(server, FAULT_MODELS) == before, "the same workers serve on"
    after = send(server, "POST", "/predictions/mnistnet", data=batch_body, headers=JSON)
    assert after.status_code == 200 and len(after.json()) == IMAGES_PER_REQUEST
    record(matrix, "overload (queue 2, 48x256)",
           f"{statuses.count(200)}x200 + {len(busy)}x503 JSON {error_message(busy[0])[:60]!r}... "
           f"(slowest 503 after {slowest_busy:.2f} s, burst {burst_s:.1f} s)",
           "nothing: refused requests were never queued; workers unchanged", "none needed (immediate)")


def test_client_retries_busy_answers_through_the_overload(fault_server, batch_body, matrix):
    server = fault_server
    images = json.loads(batch_body)["data"]
    clients = [TorchServeClient(server.inference_url, server.management_url, key_file=server.key_file,
                                retries=12, backoff=0.2, max_backoff=2.0, timeout=120) for _ in range(16)]
    started = time.monotonic()
    with ThreadPoolExecutor(len(clients)) as pool:
        answers = list(pool.map(lambda c: c.predict("mnistnet", {"data": images}), clients))
    elapsed = time.monotonic() - started
    retried = sum(c.busy_retries for c in clients)
    assert all(len(a) == IMAGES_PER_REQUEST for a in answers)
    assert retried > 0, "16 concurrent 256-image requests should overflow a queue of 2"
    # Without retries the same overload is a clear 503 error for the caller.
    plain = [TorchServeClient(server.inference_url, key_file=server.key_file, retries=0, timeout=120)
             for _ in range(16)]

    def no_retry(client):
        try:
            client.predict("mnistnet", {"data": images})
            return 200
        except TorchServeError as err:
            return err.status
    with ThreadPoolExecutor(len(plain)) as pool:
        codes = list(pool.map(no_retry, plain))
    assert set(codes) <= {200, 503} and 503 in codes, codes
    record(matrix, "overload + client retries",
           f"16/16 answered ({retried} busy answers retried, {elapsed:.1f} s); retries=0: "
           f"{codes.count(503)}/16 get TorchServeError 503", "nothing", f"{elapsed:.1f} s for all 16")


# ------------------------------------------------------------------------------------ 2. hung worker


def test_hung_worker_is_answered_and_replaced(fault_server, batch_body, matrix):
    server = fault_server
    before = worker_pids(server, FAULT_MODELS)
    old_pid = before["faulty"][0][1]
    assert send(server, "POST", "/predictions/faulty", data=b"hello").json()["pid"] == old_pid
    control = Path(server.extra_env["FAULT_CONTROL_DIR"])
    (control / "slow_load").write_text("2")  # the replacement loads for 2 s: readiness must say so
    hung: dict = {}

    def hang():
        started = time.monotonic()
        hung["response"] = send(server, "POST", "/predictions/faulty", data=b"please hang", timeout=60)
        hung["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=hang)
    sent_at = time.monotonic()
    thread.start()
    try:
        time.sleep(0.5)
        other = send(server, "POST", "/predictions/mnistnet", data=batch_body, headers=JSON)
        assert other.status_code == 200, "the other model answers while one worker hangs"
        thread.join(timeout=RESPONSE_TIMEOUT_S + 30)
        assert not thread.is_alive(), "no answer for the hung request"
        response = hung["response"]
        # TorchServe's answer when responseTimeout passes (its worker thread gives up on the worker); "error"
        # is the copy of "message" every error body carries (serve/java).
        assert response.status_code == 500, response.text
        assert response.json() == {"code": 500, "type": "InternalServerException", "message": "Worker died.",
                                   "error": "Worker died.", "request_id": response.headers["X-Request-ID"]}, response.text
        message = error_message(response)
        assert hung["seconds"] < RESPONSE_TIMEOUT_S + 3, hung["seconds"]
        not_ready = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            ready = send(server, "GET", "/v2/health/ready", timeout=10)
            pids = [w.get("pid") for w in server.describe("faulty").get("workers", [])]
            if ready.status_code != 200:
                not_ready = not_ready or (ready.status_code, ready.text[:120])
            elif not_ready and pids and pids[0] not in (None, old_pid) and send(
                    server, "POST", "/predictions/faulty", data=b"hello").status_code == 200:
                break
            time.sleep(0.1)
        recovery_s = time.monotonic() - sent_at
    finally:
        (control / "slow_load").unlink(missing_ok=True)
    assert not_ready is not None, "readiness never reported the hung/restarting worker"
    new = worker_pids(server, FAULT_MODELS)
    assert new["faulty"][0][1] != old_pid
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE, \
        "the hung worker process is gone"
    assert new["mnistnet"] == before["mnistnet"], "the other model's worker is untouched"
    answer = send(server, "POST", "/predictions/faulty", data=b"hello")
    assert answer.status_code == 200 and answer.json()["pid"] == new["faulty"][0][1]
    record(matrix, "hung worker (timeout 3 s)",
           f"{response.status_code} {response.json().get('type')} {message[:50]!r} after {hung['seconds']:.1f} s; "
           f"/v2/health/ready {not_ready[0]} meanwhile", "the hung request only; mnistnet served throughout",
           f"{recovery_s:.1f} s to a new READY worker (incl. 2 s slow load)")


# ------------------------------------------------------------------------------------ 5. keys


def test_rotated_key_is_refused_and_the_client_rereads_it(fault_server, matrix):
    server = fault_server
    client = TorchServeClient(server.inference_url, server.management_url, key_file=server.key_file)
    assert client.predict("faulty", {"x": 1})["ok"]
    old = server.keys()["inference"]
    rotate = manage(server, "POST", "/token", key="api", params={"type": "inference"})
    assert rotate.status_code == 200, rotate.text
    assert server.keys()["inference"] != old
    refused = requests.post(f"{server.inference_url}/predictions/faulty", data=b"x", timeout=10,
                            headers={"Authorization": f"Bearer {old}"})
    assert refused.status_code in (400, 401)
    assert "InvalidKeyException" in refused.text and "Token Authorization failed" in error_message(refused)
    assert client.predict("faulty", {"x": 2})["ok"], "the client re-reads the rotated key"
    assert client._keys["inference"][0] == server.keys()["inference"]
    record(matrix, "rotated inference key", f"{refused.status_code} InvalidKeyException "
           f"{error_message(refused)[:40]!r}...; client re-reads key_file.json and succeeds",
           "nothing", "next request (client)")


# ------------------------------------------------------------------------------------ 6. workflows


def test_workflow_registration_loads_nothing(fault_server, tmp_path, matrix):
    """A real archive (the served mnistnet.mar, named wf.war) by every URL form: refused outside the store,
    and by bare name inside it read and refused, because its manifest names no workflow."""
    server = fault_server
    outside = tmp_path / "wf.war"
    shutil.copy2(server.model_store / "mnistnet.mar", outside)
    inside = server.model_store / "wf.war"
    shutil.copy2(outside, inside)
    traversal = os.path.relpath(outside, server.model_store)  # ../../…/wf.war, relative to the store
    models_before = manage(server, "GET", "/models").json()
    not_allowed = "WorkflowNotFoundException", "Given URL {} does not match any allowed URL(s)"
    expected = {
        f"file://{outside}": (404, *not_allowed),
        f"file://{inside}": (404, *not_allowed),
        "http://127.0.0.1:9/wf.war": (404, *not_allowed),
        traversal: (404, "WorkflowNotFoundException", "Relative path is not allowed in url: {}"),
        "wf.war": (500, "InvalidWorkflowException", "Workflow name is not defined."),
    }
    try:
        answers = {}
        for url, (status, kind, message) in expected.items():
            response = manage(server, "POST", "/workflows", params={"url": url})
            answers[url] = (response.status_code, error_message(response))
            text = message.format(url)
            request_id = response.headers.get("X-Request-ID")
            assert request_id, (url, dict(response.headers))
            assert (response.status_code, response.json()) == (
                status, {"code": status, "type": kind, "message": text, "error": text, "request_id": request_id}
            ), (url, response.text)
        assert manage(server, "GET", "/workflows").json() == {"workflows": []}
        assert manage(server, "GET", "/models").json() == models_before
    finally:
        inside.unlink()
    print("\n".join(f"  POST /workflows?url={url}: {code} {message[:100]}" for url, (code, message) in answers.items()))
    record(matrix, "workflow registration", "refused for every URL outside the store (file://, ../, http://): "
           f"{answers[f'file://{outside}'][0]} 'does not match any allowed URL(s)'; a real archive in the store by "
           f"name: {answers['wf.war'][0]} {answers['wf.war'][1][:50]!r}", "nothing registered", "-")


# ------------------------------------------------------------------------------------ 5b + 3. expiry, JVM death


@pytest.fixture(scope="module")
def short_key_server(fault_store, tmp_path_factory):
    """Keys valid for 3 s; its JVM is killed by the last test (not waited READY: the management key expires).
    Its one worker loads for 5 minutes, so that it is caught mid-load when the JVM dies."""
    root = tmp_path_factory.mktemp("short").resolve()
    server = make_server(root, fault_store, ["faulty"], token_expiration_min="0.05")
    (root / "control" / "slow_load").write_text("300")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_expired_key_gets_a_clear_refusal(short_key_server, matrix):
    server = short_key_server
    deadline = time.monotonic() + 60
    while True:  # the management API comes up a moment after the frontend process
        try:
            if server.keys().get("api"):
                rotate = manage(server, "POST", "/token", key="api", params={"type": "inference"})
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, server.output_tail()
        time.sleep(0.2)
    assert rotate.status_code == 200, rotate.text
    client = TorchServeClient(server.inference_url, server.management_url, key_file=server.key_file, retries=0)
    assert client.health() == {"status": "Healthy"}
    time.sleep(3.5)
    with pytest.raises(TorchServeError) as refused:
        client.health()
    assert refused.value.status in (400, 401) and "expired" in refused.value.message, refused.value
    assert "InvalidKeyException" in json.dumps(refused.value.body)
    renewed = manage(server, "POST", "/token", key="api", params={"type": "inference"})
    assert renewed.status_code == 200
    assert client.health() == {"status": "Healthy"}, "the client re-reads the renewed key"
    record(matrix, "expired inference key", f"{refused.value.status} InvalidKeyException "
           f"{refused.value.message[:40]!r}...; renew with the API key (POST /token), client re-reads",
           "nothing", "one POST /token")


def test_dead_jvm_is_reported_and_stop_cleans_up(short_key_server, matrix):
    server = short_key_server
    pid = server.pid()
    deadline = time.monotonic() + 60
    while not server.grpc_listening():  # the JVM binds OIP gRPC after its REST ports (not waited READY here)
        assert pid and time.monotonic() < deadline, server.output_tail()
        time.sleep(0.2)
    frontend = psutil.Process(pid)
    deadline = time.monotonic() + 60
    while "fault_handler: loading for" not in "\n".join(server._log_since_start("model_log.log")):
        assert time.monotonic() < deadline, "the faulty model's worker never started loading"
        time.sleep(0.2)
    workers = [w for w in frontend.children(recursive=True) if "model_service_worker" in " ".join(w.cmdline())]
    assert len(workers) == 1
    cli = ["--config", str(server.config), "--workdir", str(server.workdir), "--log-dir", str(server.log_dir)]
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([frontend], timeout=10)
    code, out, err, status_s = serve_cli("status", *cli, timeout=60)
    assert code == 3, (code, out, err)
    assert "NOT running" in out and f"stale pid file, pid {pid} is gone" in out, out
    assert "serve stop" in out and "1 of its backend workers are still up" in out, out
    _, orphans = psutil.wait_procs(workers, timeout=max(0.0, killed_at + 3 - time.monotonic()))
    assert orphans, "a worker caught loading outlives its frontend (until its load ends)"
    status_line = out.strip().splitlines()[0]
    code, out, err, stop_s = serve_cli("stop", *cli, timeout=60)
    stopped_s = time.monotonic() - killed_at
    assert code == 0, err
    assert not orphans or f"killed {len(orphans)} backend worker(s) it left behind" in out, out
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"workers outlived `serve stop`: {alive}"
    assert not server.grpc_listening(), "the OIP gRPC port died with the JVM"
    code, out, _, _ = serve_cli("status", *cli, timeout=60)
    assert code == 3 and out.startswith("TorchServe is not running."), out
    assert processes_mentioning(str(server.workdir)) == []
    print(f"  serve status after the kill ({status_s:.1f} s): {status_line}\n  serve stop: {stop_s:.1f} s")
    record(matrix, "JVM SIGKILL (serve start)", "`serve status`: exit 3 'NOT running: it died (stale pid file …)'; "
           f"a worker caught loading is orphaned (still up 3 s later); `serve stop` kills it "
           f"({stopped_s:.1f} s after the kill); OIP gRPC died with the JVM",
           "every in-flight and queued request", "manual `serve stop` + `serve start` (or a supervisor)")


# ------------------------------------------------------------------------------------ 3b. container entrypoint


def _container(tmp_path: Path) -> tuple[subprocess.Popen, Ports, Path]:
    """deploy/docker/entrypoint.sh (serve start --foreground --image) with the real torchserve launcher, fork
    server (no models, no agent: so no OIP gRPC either), once TorchServe says it is ready."""
    app = tmp_path / "app"
    (app / "docker").mkdir(parents=True)
    (app / "model_store").mkdir()
    shutil.copy2(REPO_ROOT / "deploy" / "docker" / "log4j2.xml", app / "docker" / "log4j2.xml")
    ports = Ports.free()
    server_config(app / "config.properties", ports, app / "model_store")
    (tmp_path / "work").mkdir()
    (tmp_path / "t").mkdir()
    env = {**clean_env(), "APP_DIR": str(app), "OIP_AGENT_JAR": "", "PYTHON": sys.executable,
           "OIP_GRPC_LISTEN": f"127.0.0.1:{ports.oip_grpc}", "TS_WORKDIR": str(tmp_path / "work"),
           "TMPDIR": str(tmp_path / "t"), "TEMP": str(tmp_path / "t"), "PYTHONPATH": str(REPO_ROOT),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.pop("TS_CONFIG_FILE", None)
    log = tmp_path / "entrypoint.out"
    with open(log, "wb") as out:
        entry = subprocess.Popen(["bash", str(REPO_ROOT / "deploy" / "docker" / "entrypoint.sh")], env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "serve: TorchServe is ready" not in log.read_text(errors="replace"):
        assert entry.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    return entry, ports, log


def _processes(entry: subprocess.Popen, needle: str) -> list[psutil.Process]:
    return [p for p in psutil.Process(entry.pid).children(recursive=True) if needle in " ".join(p.cmdline())]


def test_entrypoint_exits_non_zero_when_the_jvm_dies(tmp_path, matrix):
    entry, _, log = _container(tmp_path)
    try:
        java = int((tmp_path / "t" / ".model_server.pid").read_text())
        killed_at = time.monotonic()
        os.kill(java, signal.SIGKILL)
        code = entry.wait(timeout=60)
        exit_s = time.monotonic() - killed_at
    finally:
        if entry.poll() is None:
            os.killpg(entry.pid, signal.SIGKILL)
            entry.wait()
    output = log.read_text()
    assert code != 0, output[-2000:]
    assert "TorchServe exited on its own" in output
    record(matrix, "JVM SIGKILL (container)", f"entrypoint exits {code} after {exit_s:.1f} s "
           "('TorchServe exited on its own')", "every in-flight and queued request",
           "the runtime restarts the container (restart policy / kubelet)")


def test_entrypoint_drains_on_sigterm_and_exits_0(tmp_path):
    entry, _, log = _container(tmp_path)
    try:
        java = psutil.Process(int((tmp_path / "t" / ".model_server.pid").read_text()))
        helpers = _processes(entry, "forkserver.py")
        entry.send_signal(signal.SIGTERM)
        code = entry.wait(timeout=90)
    finally:
        if entry.poll() is None:
            os.killpg(entry.pid, signal.SIGKILL)
            entry.wait()
    output = log.read_text()
    assert code == 0 and "serve: servers stopped (status 0)" in output, output[-2000:]
    _, alive = psutil.wait_procs([java, *helpers], timeout=10)
    assert not alive and len(helpers) == 1, (alive, helpers)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


# ------------------------------------------------------------------------------------ 4. bad start


@pytest.fixture(scope="module")
def bad_starts(tmp_path_factory) -> Path:
    """The folder under which each bad start gets its own store, config, workdir and logs."""
    return tmp_path_factory.mktemp("bad-starts").resolve()


@pytest.fixture
def unprivileged_root(tmp_path_factory):
    """A folder for a bad start that :func:`as_unprivileged`'s user can read (pytest's own temporary folders
    are private to root): world-readable, under the system's temporary folder; removed afterwards."""
    if os.geteuid() != 0:
        yield tmp_path_factory.mktemp("unprivileged").resolve()
        return
    root = Path(tempfile.mkdtemp(prefix="ts-bad-start-")).resolve()
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bad_start(root: Path, store: Path, archive_bytes: bytes | None = None, rewrite: dict | None = None,
              log_dir: Path | None = None, ports: Ports | None = None) -> tuple[list[str], Ports]:
    model_store = root / "store"
    model_store.mkdir(parents=True)
    target = model_store / "mnistnet.mar"
    if archive_bytes is not None:
        target.write_bytes(archive_bytes)
    elif rewrite is not None:
        rewrite_archive(store / "mnistnet.mar", target, rewrite)
    else:
        shutil.copy2(store / "mnistnet.mar", target)
    ports = ports or Ports.free()
    config = server_config(root / "config.properties", ports, model_store)
    args = ["start", "--models", "mnistnet", "--timeout", "120", "--config", str(config),
            "--workdir", str(root / "work"), "--log-dir", str(log_dir or root / "logs")]
    return args, ports


BAD_STARTS = {
    # case: (how, words the one line must contain)
    "truncated archive": ("truncated", ["not a readable model archive", "--rebuild"]),
    "corrupt archive": ("corrupt", ["corrupt", "--rebuild"]),
    "archive without weights": ("no-weights", ["lacks its weights mnistnet.pt", "--rebuild"]),
    "broken weights": ("garbage-weights", ["failed to load", "--rebuild", "model_log.log"]),
    "port in use": ("port", ["already in use", "(inference)", "pick other ports"]),
    "unwritable log folder": ("log-dir", ["log folder", "not writable", "--log-dir"]),
    "read-only log folder": ("log-dir-mode", ["log folder", "not writable (Permission denied)", "--log-dir"]),
}


@pytest.mark.parametrize("case", list(BAD_STARTS))
def test_bad_start_fails_fast_with_one_line(case, bad_starts, store, matrix, request):
    how, words = BAD_STARTS[case]
    # Root writes into a mode-0500 folder anyway: under root that case runs as nobody, from a folder it can read.
    root = request.getfixturevalue("unprivileged_root") / how if how == "log-dir-mode" else bad_starts / how
    good = (store / "mnistnet.mar").read_bytes()
    listener = None
    if how == "truncated":
        args, ports = bad_start(root, store, archive_bytes=good[: len(good) // 2])
    elif how == "corrupt":
        with zipfile.ZipFile(store / "mnistnet.mar") as archive:
            info = archive.getinfo("mnistnet.pt")
        corrupt = bytearray(good)
        middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
        corrupt[middle:middle + 64] = bytes(b ^ 0xFF for b in corrupt[middle:middle + 64])
        args, ports = bad_start(root, store, archive_bytes=bytes(corrupt))
    elif how == "no-weights":
        args, ports = bad_start(root, store, rewrite={"mnistnet.pt": None})
    elif how == "garbage-weights":
        args, ports = bad_start(root, store, rewrite={"mnistnet.pt": b"these are not weights" * 100})
    elif how == "port":
        args, ports = bad_start(root, store)
        listener = socket.socket()
        listener.bind(("127.0.0.1", ports.inference))
        listener.listen()
    elif how == "log-dir-mode":
        read_only = root.parent / f"{how}-logs"
        args, ports = bad_start(root, store, log_dir=read_only)
        read_only.mkdir()
        if os.geteuid() == 0:  # the unprivileged user's own folders: its work folder, and logs it may only read
            for path in (root / "work", read_only):
                path.mkdir(exist_ok=True)
                os.chown(path, NOBODY, NOBODY)
        read_only.chmod(0o500)
    else:
        blocker = root.parent / f"{how}-file"
        blocker.write_text("a file where the log folder should be\n")
        args, ports = bad_start(root, store, log_dir=blocker / "logs")
    try:
        code, out, err, seconds = serve_cli(*args, timeout=180, unprivileged=how == "log-dir-mode")
    finally:
        if listener is not None:
            listener.close()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in out + err
    time.sleep(0.5)
    stray = processes_mentioning(str(root), f"127.0.0.1:{ports.oip_grpc}")
    assert stray == [], stray
    limit = 90 if how == "garbage-weights" else 30
    assert seconds < limit, f"{case}: {seconds:.1f} s"
    record(matrix, f"bad start: {case}", f"exit 1 in {seconds:.1f} s: {lines[0].replace(str(root), '…')[:150]}",
           "-", "fix + start again")
