"""Start, watch and stop one TorchServe instance: ``python -m serve`` (host and container), the tests, bench/.

A :class:`Server` owns what one TorchServe needs to be independent of any other on the machine: its
:class:`Ports`, its ``TMPDIR`` (pid file, worker sockets; ``torchserve --stop`` finds the server through
it), its working directory (``key_file.json``, the generated config) and its log directory. ``start()``
runs the fork server (a :class:`HelperProcess`) and the launcher (serve/torchserve/launch.py); the OIP gRPC
service runs inside TorchServe's JVM (serve/torchserve/java/OipGrpc.java, on ``oip_grpc_listen`` of the
generated config); ``wait_ready()`` polls the management API until every model's workers are READY and
every port listens; ``supervise()`` watches a foreground server; ``stop()`` stops TorchServe (waiting for
Java) and the fork server. ``image=True`` is the container's way (deploy/docker/entrypoint.sh): the
config's own addresses and models, everything on stdout.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil
from tqdm import tqdm

from client.api import TorchServeClient, TorchServeError
from client.api import read_keys as read_key_file
from paths import LOG_DIR, REPO_ROOT, SERVE_WORKDIR
from serve.torchserve import agent as oip_agent
from serve.torchserve import SUPPORTED_VERSION, unsupported
from serve.torchserve.launch import (FORK_SWITCH, FORKSERVER, FORKSERVER_SOCKET, WORKER_PYTHON, forkserver_command,
                                    torchserve_command, worker_environment)

DEFAULT_CONFIG = REPO_ROOT / "config.properties"
DEFAULT_WORKDIR = SERVE_WORKDIR
DEFAULT_LOG_DIR = LOG_DIR
DEFAULT_LOG_CONFIG = REPO_ROOT / "serve" / "log4j2.xml"
# TorchServe's metrics YAML with the handlers' model-quality metrics (handlers/metrics.py), unless the
# config names its own metrics_config.
DEFAULT_METRICS_CONFIG = REPO_ROOT / "serve" / "metrics.yaml"
KEY_FILE = "key_file.json"
PID_FILE = ".model_server.pid"  # written by torchserve's launcher into $TMPDIR
JAVA_MAIN_CLASS = "org.pytorch.serve.ModelServer"
# Unix socket paths are limited to 107 bytes; TorchServe puts $TMPDIR/.ts.sock.<port> there.
MAX_SOCKET_PATH = 107
# wait_ready's poll interval (each poll describes every model not yet READY).
READY_POLL_S = 0.1

JAVA_HELP = (
    "TorchServe needs Java 17 (a JRE is enough) on PATH or in JAVA_HOME. Install it with\n"
    "  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless\n"
    "  Fedora/RHEL:   sudo dnf install -y java-17-openjdk-headless\n"
    "  macOS:         brew install openjdk@17\n"
    "then check `java -version`."
)


class ServerError(RuntimeError):
    """TorchServe could not be started, did not become ready, or could not be stopped; says why."""


# ------------------------------------------------------------------------------------ configuration

def load_properties(path: Path) -> dict[str, str]:
    """``key=value`` pairs of a TorchServe config.properties, in file order (``#``/``!`` comments and blank
    lines skipped); the one reader of these files. A line without ``=`` raises ``ValueError`` naming it."""
    props = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        if "=" not in line:
            raise ValueError(f"{path}:{number}: expected key=value, got {raw!r}")
        key, value = line.split("=", 1)
        props[key.strip()] = value.strip()
    return props


def _port_of(address: str) -> int:
    """The port of an address such as ``http://127.0.0.1:8080``."""
    match = re.search(r":(\d+)/?$", address)
    if not match:
        raise ServerError(f"cannot read a port from address {address!r}")
    return int(match.group(1))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on ``host:port`` (we can bind it). With ``SO_REUSEADDR``, as the servers
    themselves bind: connections a stopped server left in TIME-WAIT do not count, a listener does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Ports:
    """The TCP ports one TorchServe listens on; defaults are TorchServe's own."""

    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    # TorchServe's own gRPC (its native API, and with OIP on a partial OIP service: no raw tensors).
    grpc_inference: int = 7072
    grpc_management: int = 7071
    # First backend worker "port": it names the worker's unix socket ($TMPDIR/.ts.sock.<port>), and
    # each further worker (or restarted worker) counts up from it.
    worker: int = 9000
    # Our Open Inference Protocol gRPC service (in TorchServe's JVM, serve/torchserve/java/OipGrpc.java), on
    # the port OIP clients expect.
    oip_grpc: int = 7070

    @classmethod
    def from_properties(cls, props: dict[str, str]) -> "Ports":
        """The ports a config.properties asks for (TorchServe defaults for missing keys)."""
        default = cls()
        return cls(
            inference=_port_of(props["inference_address"]) if "inference_address" in props else default.inference,
            management=_port_of(props["management_address"]) if "management_address" in props else default.management,
            metrics=_port_of(props["metrics_address"]) if "metrics_address" in props else default.metrics,
            grpc_inference=int(props.get("grpc_inference_port", default.grpc_inference)),
            grpc_management=int(props.get("grpc_management_port", default.grpc_management)),
            worker=int(props.get("initial_worker_port", default.worker)),
            oip_grpc=int(props.get("oip_grpc_port", default.oip_grpc)),
        )

    @classmethod
    def free(cls) -> "Ports":
        """Six ports the OS reports free right now, and a free block of 32 for the workers."""
        sockets = []
        try:
            for _ in range(6):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind(("127.0.0.1", 0))
                sockets.append(sock)
            numbers = [sock.getsockname()[1] for sock in sockets]
        finally:
            for sock in sockets:
                sock.close()
        while True:
            base = random.randrange(20000, 30000)
            if base not in numbers and all(port_is_free(p) for p in range(base, base + 32)):
                break
        return cls(*numbers[:5], worker=base, oip_grpc=numbers[5])

    def listening(self) -> dict[str, int]:
        """Name → port of every port TorchServe binds (the worker port names sockets only)."""
        ports = asdict(self)
        ports.pop("worker")
        return ports


def effective_config(base: dict[str, str], ports: Ports, model_store: Path) -> dict[str, str]:
    """``base`` with the addresses replaced by ``ports`` and the model store made absolute."""
    props = dict(base)
    props.update(
        inference_address=f"http://127.0.0.1:{ports.inference}",
        management_address=f"http://127.0.0.1:{ports.management}",
        metrics_address=f"http://127.0.0.1:{ports.metrics}",
        grpc_inference_port=str(ports.grpc_inference),
        grpc_management_port=str(ports.grpc_management),
        initial_worker_port=str(ports.worker),
        oip_grpc_port=str(ports.oip_grpc),
        model_store=str(model_store),
        # Java regex, doubled backslashes for the properties format: only archives of this store.
        allowed_urls="file://" + re.escape(str(model_store)).replace("\\", "\\\\") + "/[^/]+\\\\.mar",
    )
    props.setdefault("metrics_config", str(DEFAULT_METRICS_CONFIG))
    return props


# TorchServe's environment variables for the addresses (read when the config says enable_envvars_config=true).
ADDRESS_VARIABLES = {
    "TS_INFERENCE_ADDRESS": "inference_address",
    "TS_MANAGEMENT_ADDRESS": "management_address",
    "TS_METRICS_ADDRESS": "metrics_address",
    "TS_GRPC_INFERENCE_PORT": "grpc_inference_port",
    "TS_GRPC_MANAGEMENT_PORT": "grpc_management_port",
}


def with_environment(props: dict[str, str]) -> dict[str, str]:
    """``props`` with the addresses TorchServe takes from ``TS_*`` variables when the config allows it."""
    props = dict(props)
    if props.get("enable_envvars_config", "false").lower() == "true":
        props.update({key: os.environ[var] for var, key in ADDRESS_VARIABLES.items() if os.environ.get(var)})
    return props


def write_properties(props: dict[str, str], path: Path, header: str) -> None:
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{key}={value}" for key, value in props.items()]
    path.write_text("\n".join(lines) + "\n")


def java_executable() -> str:
    """Path of the ``java`` TorchServe will run (``$JAVA_HOME/bin/java`` first); ``ServerError`` if none."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        java = Path(java_home) / "bin" / "java"
        if java.is_file():
            return str(java)
        raise ServerError(f"JAVA_HOME={java_home} has no bin/java.\n{JAVA_HELP}")
    java = shutil.which("java")
    if not java:
        raise ServerError(f"java was not found on PATH.\n{JAVA_HELP}")
    return java


def java_major_version(java: str) -> int | None:
    """The major version ``java -version`` reports (17 for "17.0.15", 8 for "1.8.0_412"), or None."""
    try:
        result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def check_java() -> str:
    """``java_executable()``, refusing a Java older than 11 (TorchServe 0.12's minimum; 17 recommended)."""
    java = java_executable()
    major = java_major_version(java)
    if major is not None and major < 11:
        raise ServerError(f"{java} is Java {major}; TorchServe needs Java 11 or newer.\n{JAVA_HELP}")
    return java


def check_torchserve(version: str | None = None) -> None:
    """The version guard (serve/torchserve): ``ServerError`` saying why unless ``version`` (default: the
    installed TorchServe) is the one the Java agent and the worker patches are written for."""
    refusal = unsupported(version)
    if refusal:
        raise ServerError(f"{refusal}; install it with `pip install torchserve=={SUPPORTED_VERSION}`")


def read_keys(workdir: Path) -> dict[str, str]:
    """The token-auth keys TorchServe wrote to ``<workdir>/key_file.json`` (``client.api.read_keys``):
    ``inference``, ``management`` and ``api``; empty if the file is absent."""
    return read_key_file(Path(workdir) / KEY_FILE)


def check_archive(path: Path, name: str) -> None:
    """Raise a one-line ``ServerError`` unless ``path`` is a readable model archive for ``name``: a zip
    file whose ``MAR-INF/MANIFEST.json`` names a handler and weights that the archive holds, every entry
    intact (CRC). TorchServe itself would log a corrupt archive and go on without the model."""
    fix = f"rebuild it with `python -m serve.package --models {name} --rebuild`"
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "MAR-INF/MANIFEST.json" not in names:
                raise ServerError(f"{path} has no MAR-INF/MANIFEST.json, so it is not a model archive; {fix}")
            model = json.loads(archive.read("MAR-INF/MANIFEST.json")).get("model", {})
            for field in ("handler", "serializedFile"):
                member = model.get(field)
                if member and (member.endswith(".py") or field == "serializedFile") and member not in names:
                    what = "weights" if field == "serializedFile" else "handler"
                    raise ServerError(f"{path} lacks its {what} {member} (named by its manifest); {fix}")
            bad = archive.testzip()
            if bad is not None:
                raise ServerError(f"{path} is corrupt ({bad} fails its CRC check); {fix}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, ValueError, EOFError, OSError) as err:
        raise ServerError(f"{path} is not a readable model archive ({err}: truncated or corrupt); {fix}") from None


# ------------------------------------------------------------------------------ promoted versions

ROLLOUT_STATE_DIR = ".rollout"  # in the model store (hidden: TorchServe's load_models=all skips it)
DEFAULTS_FILE = "defaults.json"


def defaults_file(model_store: Path) -> Path:
    """Where ``python -m serve rollout|rollback`` records each model's default version and its history:
    ``<model_store>/.rollout/defaults.json``, beside the archives, so that it lives as long as they do (a
    mounted store volume in the container) and every ``serve start`` on that store serves the promoted one."""
    return Path(model_store) / ROLLOUT_STATE_DIR / DEFAULTS_FILE


def read_defaults(model_store: Path) -> dict[str, dict]:
    """``{model: {"default": V, "archive": "<file>.mar", "history": [V, ...]}}`` from the record; empty when
    there is none. An unreadable record is a ``ServerError`` (it says which default the store should serve)."""
    path = defaults_file(model_store)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ServerError(f"{path} cannot be read ({err}); fix or delete it (the store then serves each "
                          "<name>.mar as its default)") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ServerError(f"{path} has no \"models\" object; fix or delete it")
    return models


def write_defaults(model_store: Path, models: dict[str, dict]) -> None:
    """Replace the record atomically (a temporary file in the same folder, fsynced, then renamed)."""
    path = defaults_file(model_store)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    with open(staged, "w") as out:
        out.write(json.dumps({"models": models}, indent=1, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(staged, path)


def default_archive(model_store: Path, name: str) -> str:
    """The archive ``serve start`` loads as ``name``'s default: the recorded one (a rollout's or rollback's)
    when it is in the store, else ``<name>.mar``. A recorded archive that is gone is said on stderr."""
    entry = read_defaults(model_store).get(name)
    archive = entry.get("archive") if isinstance(entry, dict) else None
    if archive and archive != f"{name}.mar":
        if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.mar", archive) and (Path(model_store) / archive).is_file():
            return archive
        print(f"serve: {defaults_file(model_store)} says {name} {entry.get('default')} ({archive}) is the default, "
              f"but {archive} is not in the store; serving {name}.mar", file=sys.stderr, flush=True)
    return f"{name}.mar"


def writable_dir(directory: Path, what: str, fix: str) -> None:
    """Create ``directory`` if needed and prove it writable; one-line ``ServerError`` ending with ``fix`` if not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ServerError(
            f"the {what} {directory} is not writable ({err.strerror or err}); {fix}"
        ) from None


def _wait_exited(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s for ``processes`` to exit; returns those still running. A zombie counts as
    exited: a process another parent started (e.g. the fork server of a ``serve start`` that is still
    running in the same test) stays a zombie until that parent reaps it, and ``psutil.wait_procs`` would
    wait out the whole timeout for it."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                pass
            except psutil.Error:
                alive.append(process)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


class HelperProcess:
    """A process a :class:`Server` runs beside TorchServe (the fork server): started in
    its own session with its output appended to ``log_file`` and its pid in ``pid_file``, so that a later
    ``serve status|stop`` finds it; stopped with SIGTERM, then SIGKILL after a timeout."""

    def __init__(self, name: str, pid_file: Path, marker: str, log_file: Path | None, kill_children: bool = False):
        self.name = name
        self.pid_file = pid_file
        self.marker = marker  # a word of its command line: a reused pid is not taken for it
        self.log_file = log_file  # None: this process's stdout (the container's log)
        self.kill_children = kill_children  # SIGKILL what it leaves behind (the fork server's workers)
        self.process: subprocess.Popen | None = None  # when started by this object

    def pid(self) -> int | None:
        """Its pid (from the pid file) while it runs, not a zombie, with ``marker`` in its command line."""
        try:
            pid = int(self.pid_file.read_text().strip())
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE and self.marker in process.cmdline():
                return pid
        except (FileNotFoundError, ValueError, psutil.Error):
            pass
        return None

    def running_here(self) -> bool:
        """True while the process this object started runs."""
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        """The exit code of the process this object started once it has exited, else None."""
        return self.process.poll() if self.process is not None else None

    def start(self, cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        self.stop()  # one left by a server that died
        if self.log_file is None:
            out = None
        else:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")
        try:
            self.process = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if out is not None:
                out.close()
        self.pid_file.write_text(f"{self.process.pid}\n")
        return self.process

    def log_tail(self, lines: int = 10) -> str:
        if self.log_file is None:
            return "(its output went to stdout)"
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM it, SIGKILL after ``timeout`` s (and, with ``kill_children``, whatever of its children is
        left 1 s later); reap it if this object started it; remove the pid file."""
        pid = self.pid()
        if pid is not None:
            try:
                process = psutil.Process(pid)
                kids = process.children() if self.kill_children else []
                process.terminate()
                for leftover in _wait_exited([process], timeout) + _wait_exited(kids, 1):
                    leftover.kill()
            except psutil.Error:
                pass
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.pid_file.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ server

class Server:
    """One TorchServe instance with private ports, ``TMPDIR``, working directory and logs.

    Args:
        config: base config.properties (default: the repository's); its addresses are replaced by ``ports``.
        ports: ports to listen on (default: the ones ``config`` names).
        tmpdir: TorchServe's ``TMPDIR`` (default: ``<workdir>/tmp``). ``stop()`` needs the same one.
        workdir: where TorchServe runs and writes ``key_file.json`` (default: ``.serve/``).
        model_store: directory of ``<name>.mar`` archives (default: ``model_store`` of ``config``,
            relative to the config file).
        models: model names to load (default: every registered model).
        log_dir: where ``torchserve.out`` and the log4j files go (default: ``logs/``).
        log_config: log4j2 XML (default: ``serve/log4j2.xml``, WARN to size-capped files).
        env: extra environment for the frontend and its workers (``OMP_NUM_THREADS`` defaults to 1).
        fork_workers: start the backend workers from the fork server (serve/torchserve/forkserver.py); default on
            unless the environment says ``SERVE_FORK_WORKERS=0``.
    """

    def __init__(
        self,
        config: Path = DEFAULT_CONFIG,
        ports: Ports | None = None,
        tmpdir: Path | None = None,
        workdir: Path = DEFAULT_WORKDIR,
        model_store: Path | None = None,
        models: list[str] | None = None,
        log_dir: Path = DEFAULT_LOG_DIR,
        log_config: Path = DEFAULT_LOG_CONFIG,
        env: dict[str, str] | None = None,
        fork_workers: bool | None = None,
        image: bool = False,
        torchserve_args: list[str] | tuple[str, ...] = (),
        grpc_listen: str | None = None,
    ):
        self.config = Path(config).resolve()
        if not self.config.is_file():
            raise ServerError(f"config file {self.config} does not exist")
        try:
            self.base_props = load_properties(self.config)
        except ValueError as err:
            raise ServerError(f"{err}: fix the config file") from None
        self.image = image
        self.torchserve_args = list(torchserve_args)
        # TS_* variables override the config's addresses where it allows that (the image's config): also for
        # `podman exec <ctr> python -m serve rollout|status`, which is not --image.
        self.ports = ports or Ports.from_properties(with_environment(self.base_props))
        # host:port of the OIP gRPC service (in the JVM, config key oip_grpc_listen); None: none
        if grpc_listen is None:
            grpc_listen = f"127.0.0.1:{self.ports.oip_grpc}"
        self.grpc_listen = None if grpc_listen.strip() in ("", "off") else grpc_listen.strip()
        if os.environ.get(oip_agent.AGENT_ENV, "on").strip() in ("", "off"):
            self.grpc_listen = None  # OIP gRPC is served by the agent: no agent, no OIP gRPC
        if self.grpc_listen:
            self.ports = replace(self.ports, oip_grpc=_port_of(self.grpc_listen))
        self.workdir = Path(workdir).resolve()
        self.tmpdir = Path(tmpdir).resolve() if tmpdir else self.workdir / "tmp"
        store = model_store or self.config.parent / self.base_props.get("model_store", "model_store")
        self.model_store = Path(store).resolve()
        if models is None:
            from models.registry import REGISTRY

            models = list(REGISTRY)
        self.models = list(models)
        self.archives: dict[str, str] = {}  # name -> the archive start() loads as its default (default_archive)
        self.log_dir = Path(log_dir).resolve()
        self.log_config = Path(log_config).resolve()
        self.extra_env = dict(env or {})
        if fork_workers is None:
            fork_workers = os.environ.get(FORK_SWITCH, "1") != "0"
        self.fork_workers = fork_workers
        self._launcher: subprocess.Popen | None = None
        # serve/torchserve/forkserver.py, the backend workers' parent
        logs = None if image else self.log_dir  # the image: everything on stdout, the container's log
        self.forkserver = HelperProcess("fork server", self.workdir / "forkserver.pid", str(FORKSERVER),
                                        logs and logs / "forkserver.out", kill_children=True)
        self._log_offsets: dict[str, int] = {}
        self._client: TorchServeClient | None = None

    # ------------------------------------------------------------------------------ addresses/keys

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.management}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    @property
    def key_file(self) -> Path:
        return self.workdir / KEY_FILE

    @property
    def output_file(self) -> Path:
        """The launcher's and JVM's stdout/stderr."""
        return self.log_dir / "torchserve.out"

    def keys(self) -> dict[str, str]:
        """The current token-auth keys (see :func:`read_keys`)."""
        return read_keys(self.workdir)

    # ---------------------------------------------------------------------------------- process

    def pid(self) -> int | None:
        """Pid of this server's Java frontend if it is running (from ``$TMPDIR/.model_server.pid``)."""
        try:
            pid = int((self.tmpdir / PID_FILE).read_text().strip())
            process = psutil.Process(pid)
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE and (
                JAVA_MAIN_CLASS in process.cmdline()
            ):
                return pid
        except (FileNotFoundError, ValueError, psutil.Error):
            pass
        return None

    def is_running(self) -> bool:
        return self.pid() is not None

    def stale_pid(self) -> int | None:
        """The pid in ``$TMPDIR/.model_server.pid`` when no TorchServe runs under it any more (the frontend
        died without ``torchserve --stop``, e.g. SIGKILL or an OOM kill), else None."""
        try:
            pid = int((self.tmpdir / PID_FILE).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return None if self.pid() == pid else pid

    def orphan_workers(self) -> list[psutil.Process]:
        """Backend workers of this server's TMPDIR that are alive while its frontend is not (it died: a
        worker still waiting for its frontend's connection lives on until its 30 s accept timeout)."""
        if self.pid() is not None:
            return []
        needle = str(self.tmpdir / ".ts.sock.")
        orphans = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                line = " ".join(process.info["cmdline"] or [])
            except psutil.Error:
                continue
            if "model_service_worker" in line and needle in line:
                orphans.append(process)
        return orphans

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # Each worker is a process; one torch thread each keeps 7 workers from fighting over 2 cores.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
        env.update(self.extra_env)
        env.update(
            TMPDIR=str(self.tmpdir),  # pid file (launcher) and tempfile use in the workers
            TEMP=str(self.tmpdir),  # the launcher turns it into -Djava.io.tmpdir: sockets, unpacked .mar
            LOG_LOCATION=str(self.log_dir),
            METRICS_LOCATION=str(self.log_dir),
        )
        # read by serve/torchserve/torchserve/worker_python and the fork server's client
        env.update(worker_environment(self.forkserver_socket if self.fork_workers else None))
        return env

    def _check_can_start(self) -> None:
        check_torchserve()
        check_java()
        self.archives = {name: default_archive(self.model_store, name) for name in self.models}
        missing = [name for name in self.models if not (self.model_store / self.archives[name]).is_file()]
        if missing:
            raise ServerError(
                f"no archive for {', '.join(missing)} in {self.model_store}; build them with "
                f"`python -m serve.package --models {','.join(missing)}` (or `make package`)"
            )
        if self.is_running():
            raise ServerError(
                f"a TorchServe with TMPDIR {self.tmpdir} is already running (pid {self.pid()}); "
                "stop it first (`python -m serve stop`)"
            )
        busy = [f"{port} ({name})" for name, port in self.listening_ports().items() if not port_is_free(port)]
        if busy:
            raise ServerError(f"port(s) already in use: {', '.join(busy)}; stop what listens there or pick other ports")
        socket_path = self.tmpdir / f".ts.sock.{self.ports.worker + 999}"
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            raise ServerError(f"TMPDIR {self.tmpdir} is too long for unix socket paths; use a shorter one")
        for name in self.models:  # last: reads every archive through
            check_archive(self.model_store / self.archives[name], name)

    def _check_dirs(self) -> None:
        writable_dir(self.log_dir, "log folder", "fix its permissions or pick another one with --log-dir")
        writable_dir(self.workdir, "working directory", "fix its permissions or pick another one with --workdir")
        writable_dir(self.tmpdir, "TMPDIR", "fix its permissions or pick another one with --workdir")

    def start(self, foreground: bool = False) -> None:
        """Launch TorchServe in the background (returns once the frontend process exists).

        With ``foreground=True`` the launcher stays attached (``torchserve --foreground``) and
        :meth:`wait` blocks until it exits. Raises ``ServerError`` (Java missing, archive missing,
        already running, port busy, launcher failed) with the reason.
        """
        self._check_can_start()
        self._check_dirs()
        if self.fork_workers and not self.forkserver.running_here():
            self._start_forkserver()  # first: its torch import is the longest step, it overlaps the JVM's start
        try:
            self._launch(foreground)
        except BaseException:
            if not self.is_running():
                self.forkserver.stop()
            raise

    def _launch(self, foreground: bool) -> None:
        """Start ``torchserve`` (with the OIP gRPC service in its JVM) once the checks have passed."""
        # Where this start's lines begin in the logs (load_failure reads only those).
        self._log_offsets = {
            log: (self.log_dir / log).stat().st_size if (self.log_dir / log).is_file() else 0
            for log in ("model_log.log", "ts_log.log")
        }
        self.key_file.unlink(missing_ok=True)  # a stale key file would hand out dead keys
        ts_config = self.workdir / "ts-config.properties"
        try:
            agent = oip_agent.agent_jar()
        except oip_agent.AgentBuildError as err:
            raise ServerError(f"cannot build the Open Inference Protocol agent: {err}") from None
        if self.image:  # the config's own addresses and models (the image's, or KServe's storage config)
            props = dict(self.base_props)
            props.setdefault("metrics_config", str(DEFAULT_METRICS_CONFIG))
        else:
            props = effective_config(self.base_props, self.ports, self.model_store)
        # The OIP gRPC service in the JVM (serve/torchserve/java/OipGrpc.java) listens here; "off": none.
        # It is part of the agent: without it (OIP_AGENT_JAR=off) there is no OIP gRPC.
        if agent is None:
            self.grpc_listen = None
        props["oip_grpc_listen"] = self.grpc_listen or "off"
        write_properties(oip_agent.jvm_options(props, agent), ts_config,
                         f"Generated by serve/server.py from {self.config}; edit that file instead.")
        cmd = torchserve_command(WORKER_PYTHON) + [
            "--start",
            "--ts-config", str(ts_config),
            "--model-store", str(self.model_store),
            *self._models_flag(),
            "--ncs",  # no config snapshots: the served set is what config + archives say, nothing else
            "--log-config", str(self.log_config),
            *self.torchserve_args,
        ]
        if foreground:
            cmd.append("--foreground")
        if self.image:
            out = None  # the container's log
            print(f"serve: {' '.join(cmd)}", flush=True)
        else:
            out = open(self.output_file, "ab")
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            out.flush()
        try:
            # Own session: a Ctrl-C meant for our CLI must not reach the server's process group.
            self._launcher = subprocess.Popen(
                cmd, cwd=self.workdir, env=self._environment(), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            if out is not None:
                out.close()
        if not foreground:
            try:
                code = self._launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise ServerError(f"torchserve --start did not return within 60 s; see {self.output_file}") from None
            if code != 0:
                raise ServerError(f"torchserve --start failed (exit code {code}):\n{self.output_tail()}")
        deadline = time.monotonic() + 30
        while not self.is_running():
            if time.monotonic() > deadline or (self._launcher.poll() not in (None, 0)):
                raise ServerError(f"the TorchServe frontend did not start:\n{self.output_tail()}")
            time.sleep(0.2)

    def _models_flag(self) -> list[str]:
        """``--models name=archive ...``: each model's default archive (:func:`default_archive`). In image mode
        only for the image's own ``load_models=all``: a ``--models`` flag, ``model_snapshot`` or a
        ``load_models`` list (KServe's config) is left to TorchServe as it is."""
        if self.image and ("--models" in self.torchserve_args or "model_snapshot" in self.base_props
                           or self.base_props.get("load_models", "all").strip().lower() not in ("", "all")):
            return []
        archives = {name: self.archives.get(name) or default_archive(self.model_store, name) for name in self.models}
        return ["--models", *[f"{name}={archives[name]}" for name in self.models]] if self.models else []

    # ---------------------------------------------------------------------------- fork server

    @property
    def forkserver_socket(self) -> Path:
        return self.tmpdir / FORKSERVER_SOCKET

    def forkserver_pid(self) -> int | None:
        """Pid of this server's fork server (serve/torchserve/forkserver.py) if it is running."""
        return self.forkserver.pid()

    def start_forkserver(self) -> bool:
        """Start the fork server ahead of :meth:`start` (which then keeps it), e.g. while the caller still
        imports the model registry; nothing when a server already runs here. True if started."""
        if not self.fork_workers or self.is_running() or self.forkserver.running_here():
            return False
        self._check_dirs()
        self._start_forkserver()
        return True

    def stop_forkserver(self) -> None:
        """Stop the fork server this object started, when TorchServe did not start after all."""
        if self.forkserver.running_here() and not self.is_running():
            self.forkserver.stop()

    def _start_forkserver(self) -> None:
        """Start the fork server; it listens at once and answers workers once torch is imported. It gets
        the workers' environment (minus PYTHONPATH: each worker's own builds its sys.path)."""
        env = self._environment()
        env.pop("PYTHONPATH", None)
        self.forkserver.start(forkserver_command(self.forkserver_socket), self.tmpdir, env)

    # ------------------------------------------------------------------------- OIP gRPC service

    @property
    def grpc_address(self) -> str:
        """host:port of the Open Inference Protocol gRPC service (in TorchServe's JVM)."""
        return f"127.0.0.1:{self.ports.oip_grpc}"

    def grpc_listening(self) -> bool:
        """True when this server's OIP gRPC port accepts connections (False when it runs none)."""
        if not self.grpc_listen:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            return sock.connect_ex(("127.0.0.1", self.ports.oip_grpc)) == 0

    @property
    def launched(self) -> bool:
        """True once :meth:`start` of this object has launched TorchServe (whether or not it still runs)."""
        return self._launcher is not None

    def wait(self) -> int | None:
        """Block until a foreground launcher exits; returns its exit code (None if not started here)."""
        return self._launcher.wait() if self._launcher else None

    def supervise(self, poll_s: float = 0.2) -> tuple[str, int]:
        """Block until the foreground launcher exits (it returns when Java exits); returns ``"TorchServe"``
        and its exit code."""
        while True:
            code = self._launcher.poll() if self._launcher else 0
            if code is not None:
                return "TorchServe", code
            time.sleep(poll_s)

    def output_tail(self, lines: int = 30) -> str:
        """The last lines of ``torchserve.out`` and ``ts_log.log``, for error messages."""
        parts = []
        for path in (self.output_file, self.log_dir / "ts_log.log", self.log_dir / "model_log.log"):
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts) or "(no TorchServe output)"

    # ---------------------------------------------------------------------------------- readiness

    def _log_since_start(self, log: str) -> list[str]:
        """Lines written to ``<log_dir>/<log>`` since :meth:`start` (all of it if not started here)."""
        try:
            with open(self.log_dir / log, "rb") as file:
                file.seek(self._log_offsets.get(log, 0))
                return file.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def load_failure(self, name: str) -> str | None:
        """Why ``name`` failed to load since :meth:`start`, read from the logs, or None if it did not.

        A handler that raises while loading (missing or corrupt weights, an import error) makes its worker
        exit; TorchServe then restarts it forever, with back-off, so waiting only ends at the timeout.
        The worker's lines in model_log.log (``W-<port>-<name>_<version>-stdout MODEL_LOG - ...``) say so.
        """
        thread = re.compile(rf" W-\d+-{re.escape(name)}_\S*-std(?:out|err) MODEL_LOG - (.*)$")
        died, reason = False, None
        for line in self._log_since_start("model_log.log"):
            match = thread.search(line)
            if not match:
                continue
            message = match.group(1).strip()
            if message.startswith("Failed to load model ") or "Backend worker process died." in message:
                died = True
            elif died and reason is None and re.match(r"[A-Za-z_][\w.]*(Error|Exception)(: .*)?$", message):
                reason = message  # the first exception named after the failure: the original cause
        for line in self._log_since_start("ts_log.log"):
            match = re.search(rf"Load model failed: {re.escape(name)}, error: (.*)$", line)
            if match:
                died, reason = True, reason or match.group(1).strip()
        return (reason or "its worker died while loading") if died else None

    @property
    def client(self) -> TorchServeClient:
        """The project's TorchServe client for this server, reading this server's key file; no busy retries
        (callers poll) and short timeouts. Raises :class:`client.api.TorchServeError`."""
        if self._client is None:
            self._client = TorchServeClient(self.inference_url, self.management_url,
                                            key_file=self.workdir / KEY_FILE, timeout=5.0, retries=0)
        return self._client

    def describe(self, model: str) -> dict:
        """The management API's description of ``model`` (its default version), with the management key."""
        return self.client.describe(model)[0]

    def served_models(self) -> list[str]:
        """Names of the models the running server has registered (whatever it was started with)."""
        return [model["modelName"] for model in self.client.list_models()]

    def listening_ports(self) -> dict[str, int]:
        """Name → port of every port this server binds (the OIP gRPC port only when it serves one)."""
        ports = self.ports.listening()
        if not self.grpc_listen:
            ports.pop("oip_grpc")
        return ports

    def closed_ports(self) -> list[str]:
        """``name port`` of every port of this server that does not accept a connection (yet)."""
        closed = []
        for name, port in self.listening_ports().items():
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                if sock.connect_ex(("127.0.0.1", port)) != 0:
                    closed.append(f"{name} {port}")
        return closed

    @staticmethod
    def workers_ready(description: dict) -> bool:
        """True if the model has at least ``minWorkers`` workers and every one is READY."""
        workers = description.get("workers", [])
        return len(workers) >= max(1, description.get("minWorkers", 1)) and all(
            w.get("status") == "READY" for w in workers
        )

    def wait_ready(self, timeout: float = 300.0, progress: bool = True) -> dict[str, dict]:
        """Poll ``describe`` until every model's workers are READY and every port of :class:`Ports` accepts
        connections (TorchServe binds its gRPC ports after the REST ones: forked workers can be READY
        first); returns name → description.

        Raises ``ServerError`` if the frontend dies or ``timeout`` seconds (default 300) pass, naming
        the models that are not ready (or the ports not listening) and quoting the logs.
        """
        deadline = time.monotonic() + timeout
        ready: dict[str, dict] = {}
        last_status: dict[str, str] = {}
        failed_before: dict[str, int] = {}
        bar = tqdm(total=len(self.models), desc="models ready", unit="model", disable=not progress, file=sys.stdout)
        try:
            while len(ready) < len(self.models) or self.closed_ports():
                if not self.is_running():
                    raise ServerError(f"TorchServe exited while starting:\n{self.output_tail()}")
                for name in self.models:
                    if name in ready:
                        continue
                    try:
                        description = self.describe(name)
                    except (TorchServeError, ValueError, IndexError) as exc:
                        last_status[name] = f"not answering ({type(exc).__name__})"
                        continue
                    statuses = [w.get("status") for w in description.get("workers", [])]
                    last_status[name] = ",".join(statuses) or "no workers"
                    if self.workers_ready(description):
                        ready[name] = description
                        bar.update(1)
                        bar.set_postfix_str(name)
                    else:
                        failure = self.load_failure(name)
                        # The exception line may trail the "died" line (async logging): one more poll.
                        generic = failure == "its worker died while loading"
                        failed_before[name] = failed_before.get(name, 0) + 1 if failure else 0
                        if failure and (not generic or failed_before[name] > 1):
                            raise ServerError(
                                f"model {name} failed to load: {failure[:300]}; fix or rebuild its archive "
                                f"(`python -m serve.package --models {name} --rebuild`); "
                                f"details in {self.log_dir / 'model_log.log'}"
                            )
                if len(ready) < len(self.models) or self.closed_ports():
                    if time.monotonic() > deadline:
                        waiting = ", ".join(f"{n} [{last_status.get(n, '?')}]" for n in self.models if n not in ready)
                        waiting = waiting or "every model is, but not listening: " + ", ".join(self.closed_ports())
                        raise ServerError(
                            f"models not ready after {timeout:.0f} s: {waiting}\n{self.output_tail()}"
                        )
                    time.sleep(READY_POLL_S)
        finally:
            bar.close()
        return ready

    # --------------------------------------------------------------------------------------- stop

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop this server (``torchserve --stop`` with its ``TMPDIR``) and wait for the frontend and
        its workers to exit, killing leftovers after ``timeout`` seconds. Returns False if it was not running.
        """
        pid = self.pid()
        if pid is None:
            orphans = self.orphan_workers()
            for process in orphans:
                try:
                    process.kill()
                except psutil.Error:
                    pass
            _wait_exited(orphans, 10)
            self.forkserver.stop()
            self.key_file.unlink(missing_ok=True)
            return False
        try:
            frontend = psutil.Process(pid)
            processes = [frontend, *frontend.children(recursive=True)]
        except psutil.Error:
            processes = []
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_file, "ab") as out:
            subprocess.run(
                torchserve_command(None) + ["--stop"], cwd=self.workdir, env=self._environment(),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=60,
            )
        _, alive = psutil.wait_procs(processes, timeout=timeout)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.forkserver.stop()
        if self._launcher is not None:
            try:
                self._launcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._launcher.kill()
        self.key_file.unlink(missing_ok=True)
        return True

    def __enter__(self) -> "Server":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
