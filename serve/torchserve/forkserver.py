"""Start TorchServe's Python workers by forking one process that has already imported torch.

Every TorchServe backend worker is a fresh ``python ts/model_service_worker.py`` that imports torch,
numpy and PIL before it loads its model: with 8 workers on 2 cores that import is most of a cold start
(bench/README.md, "Cold start"). ``serve/server.py`` therefore runs, beside TorchServe, one *fork server* that imports those
modules once, and gives TorchServe ``serve/torchserve/worker_python`` as its ``python``. For each worker:

1. the frontend runs ``worker_python ts/model_service_worker.py --sock-type unix ...`` (the *client*,
   this file run with ``-IS``: stdlib only), which sends its arguments, environment, working
   directory and its stdin/stdout/stderr (``SCM_RIGHTS``) to the fork server's unix socket;
2. the fork server forks; the child takes over those file descriptors, environment, directory, arguments
   and ``sys.path`` and runs ``model_service_worker.py`` as ``__main__`` with the worker patches installed
   (serve/torchserve/worker.py ``run``), as a plain worker would (the frontend reads its stdout for logs and
   metrics, and its ``[PID]`` line names the child);
3. the client forwards signals to the child, and exits with the child's exit status.

If the frontend kills the client (``destroyForcibly`` on stop, scale-down or a response timeout), the
fork server sees the client's connection close and kills the child with SIGKILL; the child also watches
that connection itself, in case the fork server is gone. Anything else makes the client ``exec`` the real
interpreter: a command line other than ``model_service_worker.py`` (pip, the metrics collector) runs as it
is; a worker gets a plain process (run_worker.py: the same patches) when there is no fork server
(``SERVE_FORKSERVER`` unset, not listening, dead) or its environment differs from the fork server's in a
variable read while importing (``OMP_*``, ``MKL_*``, ``PYTHON*`` ...). The fork server never initialises
CUDA and refuses to fork while it has more than one thread.

    python -P serve/torchserve/forkserver.py --serve SOCKET   # the fork server (serve/server.py starts it)
    serve/torchserve/worker_python ARGS...                     # the client, as TorchServe's "python"
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

SOCKET_ENV = "SERVE_FORKSERVER"  # the fork server's socket path, in the frontend's (and so the client's) env
WORKER_SCRIPT = "model_service_worker.py"
# Environment variables read while the preloaded modules import (thread pools, allocators, the
# interpreter's own settings): a worker whose value differs from the fork server's gets a plain process.
# TorchServe's own TS_* variables (the frontend adds some per worker) are read when used, not on import
# (ts.torch_handler.base_handler reads TS_IPEX_ENABLE on import: it is not preloaded).
IMPORT_TIME_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "TORCH", "PYTORCH_", "CUDA_",
                        "NVIDIA_", "LD_PRELOAD", "MALLOC_", "PYTHON", "LANG", "LC_")
IMPORT_TIME_EXEMPT = {"PYTHONPATH"}  # the child builds sys.path from it, as the interpreter would
PRELOAD = ("torch", "numpy", "numpy.random", "PIL.Image", "ts.model_service_worker", "ts.model_loader",
           "ts.service", "ts.context", "ts.protocol.otf_message_handler", "ts.metrics.metric_cache_yaml_impl")
HEADER = struct.Struct("!I")
CONNECT_TIMEOUT_S = 120.0  # the fork server answers once its imports are done (a few s; more under load)


def import_time_environment(env: dict[str, str]) -> dict[str, str]:
    """The variables of ``env`` that the preloaded modules or the interpreter read at start-up."""
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES) and k not in IMPORT_TIME_EXEMPT}


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return bytes(data)


# ------------------------------------------------------------------------------------------ client

RUN_WORKER = os.path.join(os.path.dirname(os.path.realpath(__file__)), "run_worker.py")


def _is_worker(argv: list[str]) -> bool:
    return bool(argv) and os.path.basename(argv[0]) == WORKER_SCRIPT and os.path.isfile(argv[0])


def _exec_plain(argv: list[str]) -> None:
    """Become the real interpreter with the same arguments (what TorchServe would have run); a worker
    command line through run_worker.py, which installs the worker patches first."""
    os.execv(sys.executable, [sys.executable, *([RUN_WORKER] if _is_worker(argv) else []), *argv])


def _exit_like(status: int) -> None:
    """Exit with the child's wait status: its exit code, or death by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def client(argv: list[str]) -> None:
    """Have the fork server run ``argv`` (a worker command line) as a child; fall back to exec."""
    path = os.environ.get(SOCKET_ENV)
    if not path or not _is_worker(argv):
        _exec_plain(argv)
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(CONNECT_TIMEOUT_S)
        conn.connect(path)
        socket.send_fds(conn, [HEADER.pack(len(request))], [0, 1, 2])
        conn.sendall(request)
        reply = b""
        while b"\n" not in reply:
            chunk = conn.recv(256)
            if not chunk:
                break
            reply += chunk
        first, _, reply = reply.partition(b"\n")  # the rest may already be the exit status
        kind, _, value = first.decode().strip().partition(" ")
        if kind != "pid":
            raise ConnectionError(value or "no answer")
        pid = int(value)
    except (OSError, ValueError) as err:
        print(f"serve/forkserver: starting a plain worker ({err})", file=sys.stderr, flush=True)
        _exec_plain(argv)
    conn.settimeout(None)

    def forward(sig, _frame):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    # The child owns stdin/stdout/stderr now: the frontend sees EOF when the child's copies close.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    while True:
        try:
            chunk = conn.recv(256)
        except InterruptedError:
            continue
        if not chunk:
            break
        reply += chunk
    kind, _, value = reply.decode(errors="replace").strip().partition(" ")
    _exit_like(int(value) if kind == "exit" else 1 << 8)  # no status: the fork server died; exit 1


# ------------------------------------------------------------------------------------------ server

class ForkServer:
    """The preloaded process: accepts clients, forks one worker per client, reaps them."""

    def __init__(self, path: str):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is ours alone (0600)
        try:
            if os.path.exists(path):
                os.unlink(path)
            self.listener.bind(path)
        finally:
            os.umask(old_umask)
        # Listen before importing: clients that come early wait in the backlog instead of falling back.
        self.listener.listen(64)
        self.children: dict[int, tuple[socket.socket, int]] = {}  # pid → (client connection, pidfd)
        self.base_path: list[str] = []
        self.base_env: dict[str, str] = {}
        self.worker = None  # serve.torchserve.worker, imported by preload()
        self.stopping = False

    def preload(self) -> None:
        """Import what every worker imports, and the worker patches (installed in each child); remember the
        interpreter's own sys.path and environment."""
        import importlib
        import time

        started = time.perf_counter()
        loaded = []
        for name in PRELOAD:
            try:
                importlib.import_module(name)
                loaded.append(name)
            except ImportError as err:
                print(f"forkserver: cannot preload {name}: {err}", flush=True)
        self.base_path = list(sys.path)
        # The folder that holds serve/ is on sys.path only while the patches import (as in run_worker.py).
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
        sys.path.insert(0, root)
        try:
            from serve.torchserve import worker

            self.worker = worker
        except ImportError as err:
            print(f"forkserver: cannot import the worker patches: {err}", flush=True)
        finally:
            sys.path.remove(root)
        self.base_env = import_time_environment(dict(os.environ))
        print(f"forkserver: preloaded {', '.join(loaded) or 'nothing'} in {time.perf_counter() - started:.2f} s "
              f"(pid {os.getpid()}); ready at {time.time():.3f}", flush=True)

    def refusal(self, request: dict) -> str | None:
        """Why ``request`` must get a plain worker, or None if a forked one behaves the same."""
        argv = request.get("argv") or []
        if not argv or os.path.basename(argv[0]) != WORKER_SCRIPT:
            return "not a worker command line"
        wanted = import_time_environment(request.get("env") or {})
        if wanted != self.base_env:
            names = sorted(k for k in set(wanted) | set(self.base_env) if wanted.get(k) != self.base_env.get(k))
            return f"environment differs from the fork server's in {', '.join(names)}"
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            return f"the fork server has {threads} threads"
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():  # a forked child could not use CUDA
            return "CUDA is initialised in the fork server"
        return None

    def serve(self) -> None:
        """Accept clients until SIGTERM; then kill and reap the children still running."""
        import selectors

        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        self.wake = wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ, ("accept", None))
        selector.register(wake_r, selectors.EVENT_READ, ("wake", None))
        self.selector = selector
        while not self.stopping:
            for key, _ in selector.select():
                what, pid = key.data
                if what == "accept":
                    self.accept()
                elif what == "exited":
                    self.reap(pid)
                elif what == "client":  # the client closed its end: it died; its worker goes too
                    selector.unregister(key.fileobj)
                    self.kill(pid)
                else:
                    os.read(wake_r, 512)
        for pid in list(self.children):
            self.kill(pid)
        for pid in list(self.children):
            self.reap(pid)
        os.unlink(self.path)

    def accept(self) -> None:
        import selectors

        conn, _ = self.listener.accept()
        fds: list[int] = []
        try:
            conn.settimeout(10)
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] != os.getuid():
                raise ConnectionError("a client of another user")
            header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
            if len(fds) != 3 or len(header) != HEADER.size:
                raise ConnectionError("no stdin/stdout/stderr")
            request = json.loads(_recv_exactly(conn, HEADER.unpack(header)[0]))
            reason = self.refusal(request)
            if reason:
                conn.sendall(f"fallback {reason}\n".encode())
                raise ConnectionError(reason)
            conn.settimeout(None)  # blocking before the fork: the child's copy shares the flag
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                self.run_child(conn, fds, request)  # never returns
            pidfd = os.pidfd_open(pid)
            conn.sendall(f"pid {pid}\n".encode())
        except (OSError, ValueError) as err:
            print(f"forkserver: refused a client: {err}", flush=True)
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        for fd in fds:
            os.close(fd)
        self.children[pid] = (conn, pidfd)
        self.selector.register(pidfd, selectors.EVENT_READ, ("exited", pid))
        self.selector.register(conn, selectors.EVENT_READ, ("client", pid))

    def kill(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reap(self, pid: int) -> None:
        """Collect ``pid``'s exit status and send it to its client."""
        conn, pidfd = self.children.pop(pid)
        _, status = os.waitpid(pid, 0)
        for item in (pidfd, conn):
            try:
                self.selector.unregister(item)
            except (KeyError, ValueError):
                pass
        try:
            conn.sendall(f"exit {status}\n".encode())
        except OSError:
            pass
        conn.close()
        os.close(pidfd)

    def run_child(self, conn: socket.socket, fds: list[int], request: dict) -> None:
        """In the forked child: become the worker the request describes; exit with its status."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for fd_target, fd in zip((0, 1, 2), fds):
                os.dup2(fd, fd_target)
            # Close what is the fork server's (not what the preloaded modules opened: a plain worker has those).
            for fd in fds:
                os.close(fd)
            for other, pidfd in self.children.values():
                other.close()
                os.close(pidfd)
            self.selector.close()
            self.listener.close()
            os.close(self.wake[0])
            os.close(self.wake[1])
            self.watch_client(conn.detach())
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            argv = request["argv"]
            script = os.path.realpath(argv[0])
            extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            sys.path[:] = [os.path.dirname(script), *extra, *self.base_path]
            sys.argv[:] = argv
            if "numpy.random" in sys.modules:  # a plain worker seeds its own; forked ones would share one
                sys.modules["numpy.random"].seed()
            if self.worker is not None:
                self.worker.run(argv)
            else:  # the patches did not import (the fork server said so): the stock worker
                import runpy

                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - like the interpreter: print the traceback, exit 1
            import traceback

            traceback.print_exc()
        finally:
            try:
                import atexit
                import threading

                threading._shutdown()  # what the interpreter does at exit: join non-daemon threads
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    @staticmethod
    def watch_client(fd: int) -> None:
        """A thread that kills this worker when its client's connection closes (the client died)."""
        import threading

        def watch():
            try:
                while os.read(fd, 256):
                    pass
            except OSError:
                pass
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="forkserver-client-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"] and len(argv) == 2:
        server = ForkServer(argv[1])
        server.preload()
        server.serve()
        return 0
    client(argv)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
