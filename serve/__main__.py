"""``python -m serve start|stop|status``: run TorchServe with every packaged model.

    python -m serve start [--models all|a,b] [--foreground] [--timeout 300]
    python -m serve stop
    python -m serve status
    (each takes --config config.properties, --workdir .serve, --log-dir logs)

TorchServe runs in ``.serve/`` (``key_file.json``, its TMPDIR ``.serve/tmp``) and logs to ``logs/``
(``torchserve.out``, ``ts_log.log``, ``model_log.log``). ``start`` returns once every model's workers
are READY and prints the URLs (native REST, Open Inference Protocol REST and gRPC), the keys and a curl
command to try. ``start`` also runs the OIP gRPC front (serve/oip_grpc.py) and ``stop`` stops it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from pathlib import Path

from models.registry import get_spec
from paths import EXAMPLES_DIR
from serve.package import parse_model_names
from serve.server import DEFAULT_CONFIG, DEFAULT_LOG_DIR, DEFAULT_WORKDIR, PID_FILE, Server, ServerError

EXAMPLE_PNG = EXAMPLES_DIR / "digit_7.png"


def _relative(path: Path) -> str:
    """``path`` relative to the current directory when it is below it (shorter to copy-paste)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _python() -> str:
    """How to call this interpreter from the current directory (the venv's python, e.g. .venv/bin/python)."""
    return _relative(Path(sys.executable)) if Path(sys.executable).is_relative_to(Path.cwd()) else "python"


def usage_text(server: Server, descriptions: dict[str, dict]) -> str:
    """What to tell the user once the server is ready: URLs, keys and a curl example."""
    keys = server.keys()
    workers = sum(len(d.get("workers", [])) for d in descriptions.values())
    model = "mnistnet" if "mnistnet" in server.models else server.models[0]
    inference_key = keys.get("inference", "<inference key>")
    lines = [
        f"TorchServe is ready: {len(descriptions)} models, {workers} workers READY.",
        f"  inference   {server.inference_url}/predictions/<model>[/<version>]   models: {', '.join(server.models)}",
        f"  OIP REST    {server.inference_url}/v2   (Open Inference Protocol: /v2/models/<model>[/versions/<v>]"
        "[/ready|/infer], JSON or binary tensors)",
        f"  OIP gRPC    {server.grpc_address}   (gRPC inference.GRPCInferenceService; the key as metadata "
        "authorization: Bearer <inference key>)",
        f"  management  {server.management_url}/models[/<model>]",
        f"  metrics     {server.metrics_url}   (Prometheus, no key needed)",
        f"Keys ({_relative(server.key_file)}; expire after token_expiration_min="
        f"{server.base_props.get('token_expiration_min', '60')} minutes; deleted on stop):",
        f"  inference key   {inference_key}   → Authorization: Bearer header for port {server.ports.inference}",
        f"  management key  {keys.get('management', '?')}   → for port {server.ports.management} (describe, list)",
        f"  API key         {keys.get('api', '?')}   → only rotates the two above: "
        f"POST {server.management_url}/token?type=inference",
        "Try it:",
    ]
    auth = f'-H "Authorization: Bearer {inference_key}"'
    if model == "mnistnet" and EXAMPLE_PNG.is_file():
        png = _relative(EXAMPLE_PNG)
        lines.append(f"  curl -X POST {server.inference_url}/predictions/{model} {auth} "
                     f"-H \"Content-Type: image/png\" --data-binary @{shlex.quote(png)}")
        lines.append(f"  {_python()} -m client predict {model} --png {shlex.quote(png)}    (finds the key itself)")
    else:
        sample = json.dumps({"data": [0.5] * get_spec(model).input_width})
        lines.append(f"  curl -X POST {server.inference_url}/predictions/{model} {auth} "
                     f"-H \"Content-Type: application/json\" -d {shlex.quote(sample)}")
    lines.append(f"Stop it with: {_python()} -m serve stop (or make stop)    Logs: {_relative(server.log_dir)}/")
    return "\n".join(lines)


def cmd_start(args: argparse.Namespace) -> int:
    server = Server(config=args.config, models=[], workdir=args.workdir, log_dir=args.log_dir)
    # SIGTERM (docker stop, systemd, timeout) while starting or in the foreground: stop TorchServe
    # cleanly, as for Ctrl-C, instead of dying and leaving it running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        # The fork server imports torch while this process reads the model registry (milliseconds: no torch).
        server.start_forkserver()
        server.models = parse_model_names(args.models)
        print(f"Starting TorchServe ({len(server.models)} models from {_relative(server.model_store)}); "
              f"output goes to {_relative(server.output_file)}", flush=True)
        server.start(foreground=args.foreground)
        descriptions = server.wait_ready(timeout=args.timeout)
    except BaseException:
        # Stop only a server this call launched (never one that was already running).
        if server.launched and server.is_running():
            print("TorchServe did not become ready; stopping it.", flush=True)  # stderr: the cause only
            server.stop()
        server.stop_forkserver()
        raise
    print(usage_text(server, descriptions), flush=True)
    if args.foreground:
        try:
            return server.wait() or 0
        except KeyboardInterrupt:
            return 130
        finally:
            if server.is_running():
                print("\nStopping TorchServe...", flush=True)
                server.stop()
            server.stop_forkserver()  # TorchServe exited by itself
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    server = Server(config=args.config, models=[], workdir=args.workdir, log_dir=args.log_dir)
    grpc_pid, stale, orphans = server.grpc_pid(), server.stale_pid(), server.orphan_workers()
    if server.stop():
        print("TorchServe stopped.")
    else:
        print(f"TorchServe is not running (no live server for TMPDIR {_relative(server.tmpdir)}).")
        if stale is not None:
            (server.tmpdir / PID_FILE).unlink(missing_ok=True)
            print(f"  removed the stale pid file (pid {stale} had died)")
        if grpc_pid is not None:
            print(f"  stopped the OIP gRPC front it left behind (pid {grpc_pid})")
        if orphans:
            print(f"  killed {len(orphans)} backend worker(s) it left behind (pids "
                  f"{', '.join(str(p.pid) for p in orphans)})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Exit code 0 when running with every served model READY, 1 when some are not, 3 when not running
    (also when it died: a pid file whose process is gone is reported as such)."""
    server = Server(config=args.config, models=[], workdir=args.workdir, log_dir=args.log_dir)
    pid = server.pid()
    if pid is None:
        stale, grpc_pid, orphans = server.stale_pid(), server.grpc_pid(), server.orphan_workers()
        if stale is not None:
            print(f"TorchServe is NOT running: it died (stale pid file, pid {stale} is gone)"
                  + (f"; its OIP gRPC front (pid {grpc_pid}) is still up" if grpc_pid else "")
                  + (f"; {len(orphans)} of its backend workers are still up" if orphans else "")
                  + f". See {_relative(server.log_dir)}/ts_log.log; run `{_python()} -m serve stop`, then start it again.")
        else:
            print("TorchServe is not running." + (f" (its OIP gRPC front, pid {grpc_pid}, is: "
                                                  f"`{_python()} -m serve stop` stops it)" if grpc_pid else ""))
        return 3
    print(f"TorchServe is running (pid {pid}); inference {server.inference_url}, management {server.management_url}")
    print(f"  OIP REST  {server.inference_url}/v2")
    grpc_pid = server.grpc_pid()
    print(f"  OIP gRPC  {server.grpc_address} " + (f"(pid {grpc_pid})" if grpc_pid else "NOT RUNNING (restart the server)"))
    fork_pid = server.forkserver_pid()
    print("  fork server " + (f"pid {fork_pid} (starts the backend workers)" if fork_pid else
                              "not running (backend workers start as plain Python processes)"))
    try:
        names = server.served_models()
    except Exception as exc:  # e.g. the management API is not answering yet
        print(f"  cannot list models: {exc}")
        return 1
    all_ready = bool(names)
    for name in names:
        try:
            description = server.describe(name)
        except Exception as exc:
            print(f"  {name:16s} not available ({exc})")
            all_ready = False
            continue
        workers = ", ".join(f"{w['status']} pid {w.get('pid')}" for w in description.get("workers", [])) or "no workers"
        all_ready &= server.workers_ready(description)
        print(f"  {name:16s} v{description.get('modelVersion')}  batch {description.get('batchSize')}  {workers}")
    return 0 if all_ready and grpc_pid else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # --config/--workdir/--log-dir are accepted before or after the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="config.properties (default: the repository's)")
    common.add_argument("--workdir", type=Path, default=argparse.SUPPRESS,
                        help="where TorchServe runs: key_file.json, TMPDIR tmp/ (default: .serve/)")
    common.add_argument("--log-dir", type=Path, default=argparse.SUPPRESS, help="log directory (default: logs/)")
    parser = argparse.ArgumentParser(prog="python -m serve", parents=[common],
                                     description="Run TorchServe with the packaged models.")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", parents=[common], help="start TorchServe and wait until every model is READY")
    start.add_argument("--models", default="all", help="comma-separated model names (default: all)")
    start.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the server")
    start.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for READY (default: 300)")
    commands.add_parser("stop", parents=[common], help="stop TorchServe and wait for it to exit")
    commands.add_parser("status", parents=[common], help="show the workers of every model")
    args = parser.parse_args(argv)
    for name, default in (("config", DEFAULT_CONFIG), ("workdir", DEFAULT_WORKDIR), ("log_dir", DEFAULT_LOG_DIR)):
        if not hasattr(args, name):
            setattr(args, name, default)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handlers = {"start": cmd_start, "stop": cmd_stop, "status": cmd_status}
    try:
        return handlers[args.command](args)
    except (ServerError, KeyError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
