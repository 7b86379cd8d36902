"""``python -m serve start|stop|status``: run TorchServe with every packaged model.

    python -m serve start [--models all|a,b] [--foreground] [--timeout 300]
    python -m serve start --foreground --image [-- TORCHSERVE FLAGS]   # the container's entrypoint
    python -m serve stop
    python -m serve status                       # every served version, its workers, which is the default
    python -m serve rollout mnistnet 2.0 [--margin 0.005] [--gate-samples 2000]   # serve/rollout.py
    python -m serve rollback mnistnet [--drain-timeout 30]
    (each takes --config config.properties, --workdir .serve, --log-dir logs, --tmpdir WORKDIR/tmp)

TorchServe runs in ``.serve/`` (``key_file.json``, its TMPDIR ``.serve/tmp``) and logs to ``logs/``
(``torchserve.out``, ``ts_log.log``, ``model_log.log``). ``start`` returns once every model's workers
are READY and prints the URLs (native REST, Open Inference Protocol REST and gRPC), the keys and a curl
command to try. The OIP gRPC service runs inside TorchServe's JVM (serve/torchserve/java/OipGrpc.java).

``--foreground`` stays until SIGTERM/SIGINT (then stops TorchServe and the fork server and exits 0) or
until TorchServe exits by itself (then stops the rest and exits non-zero). ``--image`` is how
deploy/docker/entrypoint.sh runs it: the config's own addresses (``TS_*`` variables override them) and
models, OIP gRPC on ``OIP_GRPC_LISTEN`` (``off``: none), everything
logged to stdout, no keys printed; flags after ``--`` go to torchserve, and its ``--ts-config`` and
``--model-store`` replace ``--config`` and the store.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import zipfile
from pathlib import Path

from paths import EXAMPLES_DIR
from serve.server import (DEFAULT_CONFIG, DEFAULT_LOG_CONFIG, DEFAULT_LOG_DIR, DEFAULT_WORKDIR, PID_FILE, Server,
                          ServerError, read_defaults)

GRPC_LISTEN_ENV = "OIP_GRPC_LISTEN"  # --image: host:port of OIP gRPC (in the JVM), "off" for none


class StopRequested(BaseException):  # like KeyboardInterrupt: no `except Exception` may swallow it
    """SIGTERM (docker stop, Kubernetes, systemd) or SIGINT: stop the servers cleanly."""


def _request_stop(signum, _frame):
    raise StopRequested(signal.Signals(signum).name)

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
        from models.registry import get_spec  # here, not at the top: the image runs this module without models/

        sample = json.dumps({"data": [0.5] * get_spec(model).input_width})
        lines.append(f"  curl -X POST {server.inference_url}/predictions/{model} {auth} "
                     f"-H \"Content-Type: application/json\" -d {shlex.quote(sample)}")
    lines.append(f"Stop it with: {_python()} -m serve stop (or make stop)    Logs: {_relative(server.log_dir)}/")
    return "\n".join(lines)


def _option_value(args: list[str], name: str) -> tuple[str | None, list[str]]:
    """The last value of torchserve flag ``name`` in ``args`` (``--name V`` or ``--name=V``) and ``args``
    without it."""
    value, rest, i = None, [], 0
    while i < len(args):
        if args[i] == name and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        if args[i].startswith(name + "="):
            value = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return value, rest


def image_models(server: Server, torchserve_args: list[str]) -> list[str]:
    """The models TorchServe will load in ``--image`` mode: those of a ``--models`` flag, else of the config's
    ``model_snapshot`` or ``load_models``, else every archive in the store (``load_models=all``)."""
    entries: list[str] = []
    if "--models" in torchserve_args:
        for arg in torchserve_args[torchserve_args.index("--models") + 1:]:
            if arg.startswith("-"):
                break
            entries += arg.split(",")
    elif "model_snapshot" in server.base_props:
        return list(json.loads(server.base_props["model_snapshot"]).get("models", {}))
    elif server.base_props.get("load_models", "all").strip().lower() not in ("", "all"):
        entries = server.base_props["load_models"].split(",")
    if not entries:
        # load_models=all: TorchServe names each model after its archive's manifest, so a versioned archive
        # (<name>-v<V>.mar from `serve.package --version`) is another version of <name>, not a model of its own.
        return sorted({archive_model_name(path) for path in server.model_store.glob("*.mar")})
    return [entry.split("=", 1)[0] if "=" in entry else Path(entry.strip()).name.removesuffix(".mar")
            for entry in entries if entry.strip()]


def archive_model_name(path: Path) -> str:
    """The model name in an archive's ``MAR-INF/MANIFEST.json`` (the file's stem if it has none to read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["modelName"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return path.stem


def make_server(args: argparse.Namespace) -> Server:
    if not getattr(args, "image", False):
        return Server(config=args.config, models=[], workdir=args.workdir, log_dir=args.log_dir, tmpdir=args.tmpdir)
    config, rest = _option_value(list(args.torchserve_args), "--ts-config")
    store, rest = _option_value(rest, "--model-store")
    server = Server(config=Path(config) if config else args.config, models=[], workdir=args.workdir,
                    log_dir=args.log_dir, tmpdir=args.tmpdir, model_store=Path(store) if store else args.model_store,
                    log_config=args.log_config or DEFAULT_LOG_CONFIG, image=True, torchserve_args=rest,
                    grpc_listen=os.environ.get(GRPC_LISTEN_ENV))
    server.models = image_models(server, rest)
    return server


def cmd_start(args: argparse.Namespace) -> int:
    server = make_server(args)
    # SIGTERM (docker stop, Kubernetes, systemd, timeout) as Ctrl-C: stop TorchServe cleanly instead of dying
    # and leaving it running.
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    try:
        if args.image:
            print(f"Starting TorchServe ({len(server.models)} models from {server.model_store})", flush=True)
        else:
            from serve.package import parse_model_names  # the registry: the host's (the image has none)

            # The fork server imports torch while this process reads the model registry (milliseconds: no torch).
            server.start_forkserver()
            server.models = parse_model_names(args.models)
            print(f"Starting TorchServe ({len(server.models)} models from {_relative(server.model_store)}); "
                  f"output goes to {_relative(server.output_file)}", flush=True)
        server.start(foreground=args.foreground)
        descriptions = server.wait_ready(timeout=args.timeout, progress=not args.image)
    except BaseException as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the stop short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if isinstance(exc, StopRequested):
            print(f"serve: {exc} received while starting, stopping the servers", file=sys.stderr, flush=True)
        # Stop only a server this call launched (never one that was already running).
        if server.launched and server.is_running():
            if not isinstance(exc, StopRequested):
                print("TorchServe did not become ready; stopping it.", flush=True)  # stderr: the cause only
            server.stop()
        server.stop_forkserver()
        if isinstance(exc, StopRequested):
            code = 0 if args.foreground else 143
            print(f"serve: servers stopped (status {code})", file=sys.stderr, flush=True)
            return code
        raise
    if args.image:
        workers = sum(len(d.get("workers", [])) for d in descriptions.values())
        print(f"serve: TorchServe is ready: {len(descriptions)} models, {workers} workers READY; OIP gRPC "
              f"{server.grpc_listen or 'off'}", flush=True)
    else:
        print(usage_text(server, descriptions), flush=True)
    if not args.foreground:
        return 0
    try:
        name, code = server.supervise()
    except StopRequested as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"serve: {exc} received, stopping the servers", file=sys.stderr, flush=True)
        server.stop()
        print("serve: servers stopped (status 0)", file=sys.stderr, flush=True)
        return 0
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"serve: {name} exited on its own (status {code}); stopping the rest", file=sys.stderr, flush=True)
    server.stop()
    return code or 1  # an exit nobody asked for is a failure (the launcher says 0 whatever happened to Java)


def cmd_stop(args: argparse.Namespace) -> int:
    server = make_server(args)
    stale, orphans = server.stale_pid(), server.orphan_workers()
    if server.stop():
        print("TorchServe stopped.")
    else:
        print(f"TorchServe is not running (no live server for TMPDIR {_relative(server.tmpdir)}).")
        if stale is not None:
            (server.tmpdir / PID_FILE).unlink(missing_ok=True)
            print(f"  removed the stale pid file (pid {stale} had died)")
        if orphans:
            print(f"  killed {len(orphans)} backend worker(s) it left behind (pids "
                  f"{', '.join(str(p.pid) for p in orphans)})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Exit code 0 when running with every served model READY, 1 when some are not, 3 when not running
    (also when it died: a pid file whose process is gone is reported as such)."""
    server = make_server(args)
    pid = server.pid()
    if pid is None:
        stale, orphans = server.stale_pid(), server.orphan_workers()
        if stale is not None:
            print(f"TorchServe is NOT running: it died (stale pid file, pid {stale} is gone)"
                  + (f"; {len(orphans)} of its backend workers are still up" if orphans else "")
                  + f". See {_relative(server.log_dir)}/ts_log.log; run `{_python()} -m serve stop`, then start it again.")
        else:
            print("TorchServe is not running.")
        return 3
    print(f"TorchServe is running (pid {pid}); inference {server.inference_url}, management {server.management_url}")
    print(f"  OIP REST  {server.inference_url}/v2")
    grpc_ok = server.grpc_listening() or not server.grpc_listen
    print(f"  OIP gRPC  {server.grpc_address} " + ("(in TorchServe's JVM)" if server.grpc_listen and grpc_ok else
                                                  "off" if grpc_ok else "NOT LISTENING (see ts_log.log; restart the server)"))
    fork_pid = server.forkserver_pid()
    print("  fork server " + (f"pid {fork_pid} (starts the backend workers)" if fork_pid else
                              "not running (backend workers start as plain Python processes)"))
    try:
        names = server.served_models()
    except Exception as exc:  # e.g. the management API is not answering yet
        print(f"  cannot list models: {exc}")
        return 1
    all_ready = bool(names)
    try:  # what rollout/rollback recorded in the store: the default a restart serves
        records = read_defaults(server.model_store)
    except ServerError as exc:
        print(f"  {exc}")
        records = {}
    for name in names:
        try:
            description = server.describe(name)
        except Exception as exc:
            print(f"  {name:16s} not available ({exc})")
            all_ready = False
            continue
        try:  # every served version (a rollout serves two for a while), the default first
            versions = [d for d in server.client.describe(name, "all")
                        if d.get("modelVersion") != description.get("modelVersion")]
        except Exception:
            versions = []
        for index, version in enumerate([description, *versions]):
            workers = ", ".join(f"{w['status']} pid {w.get('pid')}" for w in version.get("workers", [])) or "no workers"
            all_ready &= index > 0 or server.workers_ready(description)
            role = "default" if index == 0 else "also served"
            print(f"  {name if index == 0 else '':16s} v{version.get('modelVersion')} ({role})  "
                  f"batch {version.get('batchSize')}  {workers}")
        recorded = records.get(name)
        if isinstance(recorded, dict) and recorded.get("default"):
            print(f"  {'':16s} recorded default v{recorded['default']} ({recorded.get('archive')}; history "
                  f"{' -> '.join(recorded.get('history', []))}): a restart serves it")
    return 0 if all_ready and grpc_ok else 1


def _rollout(args: argparse.Namespace):
    from serve.rollout import Rollout

    # Progress on stderr, the JSON report alone on stdout (pipe it to jq).
    return Rollout(make_server(args), log=lambda line: print(line, file=sys.stderr, flush=True), timeout=args.timeout)


def cmd_rollout(args: argparse.Namespace) -> int:
    """Exit 0: the new version is the default; 4: the quality gate refused it (the default is unchanged)."""
    from serve.rollout import RolloutError, print_report

    try:
        report = _rollout(args).rollout(args.model, args.version, margin=args.margin, gate_samples=args.gate_samples,
                                        drain_timeout=args.drain_timeout, report_path=args.report)
    except RolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_report(report)
    return 0 if report["passed"] else 4


def cmd_rollback(args: argparse.Namespace) -> int:
    from serve.rollout import RolloutError, print_report

    try:
        report = _rollout(args).rollback(args.model, drain_timeout=args.drain_timeout)
    except RolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_report(report)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # --config/--workdir/--log-dir are accepted before or after the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="config.properties (default: the repository's)")
    common.add_argument("--workdir", type=Path, default=argparse.SUPPRESS,
                        help="where TorchServe runs: key_file.json, TMPDIR tmp/ (default: .serve/)")
    common.add_argument("--log-dir", type=Path, default=argparse.SUPPRESS, help="log directory (default: logs/)")
    common.add_argument("--tmpdir", type=Path, default=argparse.SUPPRESS,
                        help="TorchServe's TMPDIR: pid file, worker sockets (default: <workdir>/tmp)")
    parser = argparse.ArgumentParser(prog="python -m serve", parents=[common],
                                     description="Run TorchServe with the packaged models.")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", parents=[common], help="start TorchServe and wait until every model is READY")
    start.add_argument("--models", default="all", help="comma-separated model names (default: all)")
    start.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the server")
    start.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for READY (default: 300)")
    start.add_argument("--image", action="store_true",
                       help="the container's way: the config's own addresses and models, output on stdout; "
                            "flags after -- go to torchserve (deploy/docker/entrypoint.sh)")
    start.add_argument("--model-store", type=Path, default=None, help="with --image: the archives' folder")
    start.add_argument("--log-config", type=Path, default=None, help="with --image: log4j2 XML for TorchServe")
    commands.add_parser("stop", parents=[common], help="stop TorchServe and wait for it to exit")
    commands.add_parser("status", parents=[common], help="show every served version, its workers, the default")
    from serve.rollout import DEFAULT_GATE_SAMPLES, DEFAULT_MARGIN, DRAIN_TIMEOUT_S

    rollout = commands.add_parser("rollout", parents=[common],
                                  help="serve model_store/<model>-v<V>.mar beside the default, gate it, promote it")
    rollout.add_argument("model")
    rollout.add_argument("version")
    rollout.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                         help=f"how much worse V may be: accuracy points (absolute) or MSE (relative); "
                              f"default {DEFAULT_MARGIN}")
    rollout.add_argument("--gate-samples", type=int, default=DEFAULT_GATE_SAMPLES,
                         help=f"first N held-out samples for the gate, 0 = all (default {DEFAULT_GATE_SAMPLES})")
    rollout.add_argument("--report", type=Path, default=None,
                         help="JSON report file (default <workdir>/rollouts/rollout-<model>-<V>-<time>.json)")
    rollback = commands.add_parser("rollback", parents=[common], help="make the previous default the default again")
    rollback.add_argument("model")
    for command in (rollout, rollback):
        command.add_argument("--timeout", type=float, default=120.0, help="seconds per step (default 120)")
        command.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S,
                             help=f"longest wait, in seconds, for the old version to answer the requests it has "
                                  f"(queued or being run) before it is retired anyway (default {DRAIN_TIMEOUT_S:g})")
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.torchserve_args = passed
    if passed and not getattr(args, "image", False):
        parser.error("torchserve flags after -- need start --image")
    # In the image, TS_WORKDIR (the Dockerfile's) is where its TorchServe runs: `podman exec <ctr> python -m serve
    # rollout|status ...` finds the keys and the rollout secret's folder there.
    image_workdir = os.environ.get("TS_WORKDIR")
    workdir = Path(image_workdir) if image_workdir else DEFAULT_WORKDIR
    tmpdir = Path(os.environ.get("TMPDIR") or "/tmp") if image_workdir else None  # the entrypoint's --tmpdir
    for name, default in (("config", DEFAULT_CONFIG), ("workdir", workdir), ("log_dir", DEFAULT_LOG_DIR),
                          ("tmpdir", tmpdir)):
        if not hasattr(args, name):
            setattr(args, name, default)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handlers = {"start": cmd_start, "stop": cmd_stop, "status": cmd_status, "rollout": cmd_rollout,
                "rollback": cmd_rollback}
    try:
        return handlers[args.command](args)
    except (ServerError, KeyError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
