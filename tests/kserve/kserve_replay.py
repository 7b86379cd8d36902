"""Replay KServe's predictor pod locally: the container spec of deploy/kserve/servingruntime.yaml merged
with an InferenceService, run on this machine with only the image paths and the ports mapped.

What KServe does, and what this module does in its place:

===============================================  ==========================================================
KServe / Kubernetes                              here
===============================================  ==========================================================
storage-initializer downloads ``storageUri``     ``make_storage.build_storage`` into a temp dir, made
to ``/mnt/models`` (read-only volume)            read-only, mapped to ``/mnt/models``
predictor container = runtime container merged   :func:`predictor_container` (env by name, ports by
with the InferenceService's model spec           containerPort, args concatenated, the rest replaced)
image ``ENTRYPOINT``/``ENV``/``WORKDIR``         read from the Dockerfile's runtime stage
the image's files (``COPY`` into ``/app`` ...)   a temp "image root" whose entries link to the checkout,
                                                 derived from the Dockerfile's ``COPY`` lines
``/opt/venv``                                    this interpreter's venv (``sys.prefix``)
``/tmp``, ``/home/model-server``                 private temp dirs (``TMPDIR``/``TEMP``, the cwd)
the pod's own ports (8080, 7070, 8081 ...)       free local ports, substituted wherever the container
                                                 spec names them; 0.0.0.0 binds become 127.0.0.1
traffic to the predictor's port (KServe         plain HTTP/gRPC to the mapped port: KServe forwards
forwards requests unchanged)                     the client's request unchanged
kubelet probes, SIGTERM on delete                the spec's probes against the mapped ports; SIGTERM
===============================================  ==========================================================

Nothing else is invented: the command is the image's ENTRYPOINT (or the container's ``command``),
the arguments and environment are the spec's, so a manifest or Dockerfile change that breaks the
cluster path breaks the replay.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml
from dockerfile_support import runtime_stage  # noqa: E402

from paths import REPO_ROOT as REPO
from servers import free_port
KSERVE_DIR = REPO / "deploy" / "kserve"
RUNTIME_FILE = KSERVE_DIR / "servingruntime.yaml"
# KServe's constants: the predictor's default port and where storage-initializer puts storageUri.
KSERVE_DEFAULT_PORT = 8080
MODEL_MOUNT = "/mnt/models"
PREDICTOR_CONTAINER = "kserve-container"
# InferenceService model-spec fields that select/describe the runtime rather than patch its container.
MODEL_SPEC_ONLY = {"modelFormat", "runtime", "runtimeVersion", "protocolVersion", "storageUri", "storage"}
# Base image PATH (python:3.11-slim) that the Dockerfile's `ENV PATH=/opt/venv/bin:$PATH` extends.
BASE_IMAGE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"


# ------------------------------------------------------------------------------------ manifests


def runtime() -> dict:
    """The ClusterServingRuntime/ServingRuntime of deploy/kserve/servingruntime.yaml."""
    docs = [d for d in yaml.safe_load_all(RUNTIME_FILE.read_text()) if d]
    assert len(docs) == 1, f"{RUNTIME_FILE} must hold exactly one runtime, found {len(docs)} documents"
    return docs[0]


def inference_services() -> dict[str, dict]:
    """file name → InferenceService, for every deploy/kserve/inferenceservice*.yaml."""
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(KSERVE_DIR.glob("inferenceservice*.yaml"))}


def inference_service(protocol: str) -> dict:
    """The InferenceService whose model uses ``protocol`` (v1, v2, grpc-v2); a canary revision of one
    (``canaryTrafficPercent``, inferenceservice-canary.yaml) is not another service."""
    matches = [i for i in inference_services().values() if i["spec"]["predictor"]["model"].get("protocolVersion") == protocol
               and "canaryTrafficPercent" not in i["spec"]["predictor"]]
    assert len(matches) == 1, f"expected one InferenceService with protocolVersion {protocol}, found {len(matches)}"
    return matches[0]


def _merge_list(base: list[dict], patch: list[dict], key: str) -> list[dict]:
    """Strategic-merge of two lists of objects by ``key`` (what Kubernetes does for env and ports)."""
    merged = [copy.deepcopy(item) for item in base]
    for item in patch:
        for i, existing in enumerate(merged):
            if existing.get(key) == item.get(key):
                merged[i] = {**existing, **copy.deepcopy(item)}
                break
        else:
            merged.append(copy.deepcopy(item))
    return merged


def _render(value, meta: dict):
    """KServe's placeholders ({{.Name}}, {{.Labels.x}}, {{.Annotations.x}}) in every string of ``value``."""
    if isinstance(value, str):
        def one(match: re.Match) -> str:
            path = match.group(1).split(".")
            node = {"Name": meta.get("name", ""), "Namespace": meta.get("namespace", ""),
                    "Labels": meta.get("labels", {}), "Annotations": meta.get("annotations", {})}
            for part in path:
                node = node.get(part, "") if isinstance(node, dict) else ""
            return str(node)
        return re.sub(r"\{\{\s*\.([\w.]+)\s*\}\}", one, value)
    if isinstance(value, list):
        return [_render(v, meta) for v in value]
    if isinstance(value, dict):
        return {k: _render(v, meta) for k, v in value.items()}
    return value


def predictor_container(isvc: dict, serving_runtime: dict | None = None) -> dict:
    """The predictor container KServe builds for ``isvc``: the runtime's ``kserve-container`` merged with
    the InferenceService's model spec (pkg/controller/v1beta1/inferenceservice/utils MergeRuntimeContainers:
    a strategic merge, args concatenated), placeholders rendered with the InferenceService's metadata."""
    serving_runtime = serving_runtime or runtime()
    model = isvc["spec"]["predictor"]["model"]
    assert model.get("runtime") == serving_runtime["metadata"]["name"], (
        f"InferenceService {isvc['metadata']['name']} does not select runtime {serving_runtime['metadata']['name']}")
    (base,) = [c for c in serving_runtime["spec"]["containers"] if c["name"] == PREDICTOR_CONTAINER]
    patch = {k: v for k, v in model.items() if k not in MODEL_SPEC_ONLY}
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if key == "env":
            merged["env"] = _merge_list(base.get("env", []), value, "name")
        elif key == "ports":
            merged["ports"] = _merge_list(base.get("ports", []), value, "containerPort")
        elif key == "args":
            merged["args"] = list(base.get("args", [])) + list(value)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = {**base[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return _render(merged, isvc["metadata"])


def serving_ports(container: dict) -> list[dict]:
    """The container ports KServe routes to: the declared ones, else KServe's default 8080 (named http1)."""
    return container.get("ports") or [{"name": "http1", "containerPort": KSERVE_DEFAULT_PORT, "protocol": "TCP"}]


# ----------------------------------------------------------------------------------- Dockerfile


@dataclass(frozen=True)
class Image:
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    workdir: str
    copies: list[tuple[str | None, list[str], str]]  # (--from stage or None, sources, destination)


def _split_env(args: str) -> list[tuple[str, str]]:
    """``ENV A=1 B="x y"`` → [("A", "1"), ("B", "x y")] (the key=value form only)."""
    import shlex

    pairs = []
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        assert sep, f"Dockerfile ENV must use KEY=VALUE, got {token!r}"
        pairs.append((key, value))
    return pairs


def image() -> Image:
    """What the runtime stage gives a container: ENTRYPOINT, CMD, ENV (in order, $VAR expanded), WORKDIR,
    and the files it COPYs in."""
    import json
    import shlex

    env: dict[str, str] = {"PATH": BASE_IMAGE_PATH}
    entrypoint: list[str] = []
    cmd: list[str] = []
    workdir = "/"
    copies = []
    for instruction, args in runtime_stage():
        if instruction == "ENV":
            for key, value in _split_env(args):
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
        elif instruction == "ENTRYPOINT":
            entrypoint = json.loads(args)
        elif instruction == "CMD":
            cmd = json.loads(args)
        elif instruction == "WORKDIR":
            workdir = args
        elif instruction == "COPY":
            words = shlex.split(args)
            stage = None
            flags = [w for w in words if w.startswith("--")]
            for flag in flags:
                if flag.startswith("--from="):
                    stage = flag.split("=", 1)[1]
            paths = [w for w in words if not w.startswith("--")]
            copies.append((stage, paths[:-1], paths[-1]))
    return Image(entrypoint, cmd, env, workdir, copies)


# ------------------------------------------------------------------------------------ the replay


PORT_IN_ADDRESS = re.compile(r"(?<=:)(\d{2,5})(?![\d.])")


def container_ports(container: dict) -> set[int]:
    """Every port the container spec names: serving ports, probe ports, ports in env addresses/values."""
    ports = {p["containerPort"] for p in serving_ports(container)}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        for handler in ("httpGet", "tcpSocket", "grpc"):
            port = container.get(probe, {}).get(handler, {}).get("port")
            if isinstance(port, int):
                ports.add(port)
    for item in container.get("env", []):
        value = str(item.get("value", ""))
        if item["name"].endswith("_PORT") and value.isdigit():
            ports.add(int(value))
        ports.update(int(p) for p in PORT_IN_ADDRESS.findall(value) if int(p) > 1000)
    return ports


@dataclass
class Layout:
    """The local stand-ins of the pod's file system."""

    root: Path            # the temp dir holding everything below
    image_root: Path      # stands for the image's "/" (only what the Dockerfile COPYs, as links)
    storage: Path         # /mnt/models
    workdir: Path         # the image's WORKDIR (TorchServe's cwd)
    tmpdir: Path          # /tmp
    paths: dict[str, Path] = field(default_factory=dict)  # image path prefix → local path


def build_layout(root: Path, storage: Path, stage_outputs: dict[tuple[str, str], Path],
                 img: Image | None = None) -> Layout:
    """A temp image root with one link per Dockerfile COPY of the runtime stage (the checkout for
    build-context copies, ``stage_outputs[(stage, source)]`` for ``--from`` copies) and the path map."""
    img = img or image()
    image_root = root / "image"
    image_root.mkdir(parents=True)
    for stage, sources, dest in img.copies:
        for source in sources:
            if stage is None:
                local = REPO / source.rstrip("/")
                if source.endswith(".repo") or dest.endswith(".repo"):
                    continue  # the Dockerfile's own scratch copy, turned into /app/config.properties by RUN
            else:
                assert (stage, source) in stage_outputs, (
                    f"the replay does not know what `COPY --from={stage} {source} {dest}` holds: "
                    f"add it to the stage outputs in tests/kserve")
                local = stage_outputs[(stage, source)]
            target = image_root / dest.lstrip("/")
            if dest.endswith("/") and not source.endswith("/") and "*" not in source:
                target = target / Path(source).name
            if "*" in source:  # e.g. /src/model_store/*.mar → a directory of those files
                target.mkdir(parents=True, exist_ok=True)
                for item in sorted(local.parent.glob(local.name)):
                    (target / item.name).symlink_to(item)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() or target.is_symlink():
                target.unlink()
            target.symlink_to(local.resolve(), target_is_directory=local.is_dir())
    workdir = root / "workdir"
    tmpdir = root / "tmp"
    workdir.mkdir()
    tmpdir.mkdir()
    paths = {MODEL_MOUNT: storage, img.workdir: workdir, "/tmp": tmpdir}
    for top in sorted({Path(dest).parts[1] for _, _, dest in img.copies}):
        paths[f"/{top}"] = image_root / top
    venv = "/opt/venv"
    assert any(dest.rstrip("/") == venv for _, _, dest in img.copies), "the image no longer ships /opt/venv"
    paths[venv] = Path(sys.prefix)
    return Layout(root, image_root, storage, workdir, tmpdir, paths)


def map_value(value: str, paths: dict[str, Path], ports: dict[int, int]) -> str:
    """One string of the container spec with pod ports and image paths replaced by the local ones (one
    pass each, so a substituted local path is never mapped again); 0.0.0.0 binds become 127.0.0.1."""
    value = PORT_IN_ADDRESS.sub(lambda m: str(ports.get(int(m.group(1)), m.group(1))), value)
    prefixes = sorted(paths, key=len, reverse=True)
    pattern = re.compile(r"(^|[:=\s])(" + "|".join(map(re.escape, prefixes)) + r")(?=$|[/:\s])")
    value = pattern.sub(lambda m: m.group(1) + str(paths[m.group(2)]), value)
    return value.replace("0.0.0.0", "127.0.0.1")


@dataclass
class Pod:
    """One replayed predictor container: its process, mapped ports, layout and log."""

    container: dict
    layout: Layout
    ports: dict[int, int]
    command: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen | None = None

    def url(self, port: int, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[port]}{path}"

    def address(self, port: int) -> str:
        return f"127.0.0.1:{self.ports[port]}"

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(text[-lines:])

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.command, env=self.env, cwd=self.layout.workdir, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def probe(self, name: str, timeout: float | None = None) -> tuple[bool, str]:
        """Run the container's ``name`` probe once as the kubelet would; (passed, detail)."""
        spec = self.container[name]
        timeout = timeout or spec.get("timeoutSeconds", 1)
        if "httpGet" in spec:
            get = spec["httpGet"]
            try:
                response = requests.get(self.url(get["port"], get.get("path", "/")), timeout=timeout)
            except requests.RequestException as err:
                return False, f"{type(err).__name__}"
            return 200 <= response.status_code < 400, f"HTTP {response.status_code} {response.text[:200]}"
        if "exec" in spec:
            command = [map_value(arg, self.layout.paths, self.ports) for arg in spec["exec"]["command"]]
            command[0] = shutil.which(command[0], path=self.env["PATH"]) or command[0]
            try:
                result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=max(timeout, 10))
            except subprocess.TimeoutExpired:
                return False, "timed out"
            return result.returncode == 0, (result.stdout + result.stderr).strip()
        if "tcpSocket" in spec:
            try:
                with socket.create_connection(("127.0.0.1", self.ports[spec["tcpSocket"]["port"]]), timeout=timeout):
                    return True, "connected"
            except OSError as err:
                return False, str(err)
        raise AssertionError(f"{name}: unsupported probe handler {sorted(spec)}")

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Poll the readiness probe (every second, not the spec's period) until it passes."""
        deadline = time.monotonic() + timeout
        detail = "never probed"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the container exited ({self.process.returncode}) before it was ready:\n{self.log_tail()}")
            passed, detail = self.probe("readinessProbe")
            if passed:
                return
            time.sleep(1.0)
        raise AssertionError(f"not ready after {timeout:.0f} s (last probe: {detail}):\n{self.log_tail()}")

    def workers_ready(self, management_port: int) -> dict[str, str]:
        """model → its workers' states from the management API ("READY" only when all of them are)."""
        states = {}
        for model in requests.get(self.url(management_port, "/models"), timeout=10).json()["models"]:
            name = model["modelName"]
            workers = []
            for version in requests.get(self.url(management_port, f"/models/{name}"), timeout=10).json():
                need = max(1, version.get("minWorkers", 1))
                statuses = [w["status"] for w in version.get("workers", [])]
                workers += statuses if len(statuses) >= need else statuses + ["MISSING"] * (need - len(statuses))
            states[name] = "READY" if workers and all(w == "READY" for w in workers) else ",".join(workers) or "none"
        return states

    def terminate(self, grace: float) -> int | None:
        """SIGTERM the container's main process (what the kubelet does) and wait ``grace`` seconds; then
        SIGKILL the whole process group. Returns the exit code, or None if it had to be killed."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def leftover_java(self) -> list[int]:
        """Pids of Java frontends still running with this pod's TMPDIR (none after a clean stop)."""
        import psutil

        pids = []
        for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
            try:
                cmdline = proc.info["cmdline"] or []
                if "org.pytorch.serve.ModelServer" in cmdline and f"-Djava.io.tmpdir={self.layout.tmpdir}" in cmdline:
                    pids.append(proc.info["pid"])
            except (psutil.Error, TypeError):
                continue
        return pids


def prepare_pod(container: dict, layout: Layout, img: Image | None = None) -> Pod:
    """The local command and environment of ``container`` (not started)."""
    img = img or image()
    ports = {port: free_port() for port in sorted(container_ports(container))}
    command = list(container.get("command") or img.entrypoint)
    args = list(container["args"]) if "args" in container else list(img.cmd)
    if command[:1] == ["/usr/bin/tini"] and not shutil.which("tini"):
        # tini only reaps zombies and forwards signals to the entrypoint: without it, signal the entrypoint.
        command = command[2:] if command[1:2] == ["--"] else command[1:]
    command = [map_value(part, layout.paths, ports) for part in command + args]
    env = dict(img.env)
    env.update({item["name"]: str(item.get("value", "")) for item in container.get("env", [])})
    env = {key: map_value(value, layout.paths, ports) for key, value in env.items()}
    for key, value in env.items():  # bare port numbers (TS_GRPC_INFERENCE_PORT=7072)
        if key.endswith("_PORT") and value.isdigit() and int(value) in ports:
            env[key] = str(ports[int(value)])
    # The local stand-ins for what the node provides: /tmp (TorchServe's launcher reads TMPDIR and TEMP),
    # a HOME, and the host's Java (the image installs Debian's JRE on the base PATH).
    env.update(TMPDIR=str(layout.tmpdir), TEMP=str(layout.tmpdir), HOME=str(layout.workdir))
    env["PATH"] = env["PATH"].replace(BASE_IMAGE_PATH, os.environ.get("PATH", BASE_IMAGE_PATH))
    if os.environ.get("JAVA_HOME"):
        env["JAVA_HOME"] = os.environ["JAVA_HOME"]
    for key in ("LANG", "LC_ALL"):
        if key in os.environ:
            env[key] = os.environ[key]
    return Pod(container, layout, ports, command, env, layout.root / "container.log")


def port_is_closed(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def load_make_storage():
    """deploy/kserve/make_storage.py as a module (it is a script, not in a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_storage", KSERVE_DIR / "make_storage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
