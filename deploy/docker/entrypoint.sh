#!/bin/bash
# Container entrypoint, run by tini (PID 1): TorchServe (REST: native, KServe v1 and the Open Inference
# Protocol through our Java agent) and our OIP gRPC front (serve/oip_grpc.py), both in the foreground,
# logging to stdout. The same two processes `make serve` runs (serve/server.py).
#
#   (no arguments)      both servers with the image's config and model store
#   -*  (flags)         the same, with these torchserve flags appended; --ts-config / --model-store
#                       replace the image's (KServe's ServingRuntime passes the /mnt/models ones)
#   anything else       run that command instead (e.g. `bash`, `python3 /app/docker/tsctl.py key`)
#
# Environment (defaults are the image's; deploy/kserve/servingruntime.yaml sets some of them):
#   APP_DIR            image layout root: config.properties, model_store/, docker/, oip/   (/app)
#   OIP_AGENT_JAR      the OIP Java agent; empty: TorchServe's own partial OIP   ($APP_DIR/oip/oip-agent.jar)
#   OIP_GRPC_LISTEN    HOST:PORT of the OIP gRPC front; empty or "off": no gRPC front   (0.0.0.0:7070)
#   OIP_GRPC_REST      the REST address the front forwards to   (TS_INFERENCE_ADDRESS, via loopback)
#   PYTHON             the Python that runs the gRPC front and the fork server   (python3)
#   FORK_WORKERS       1: TorchServe's backend workers are forked from one process that has imported
#                      torch (serve/torchserve/forkserver.py, as `make serve` does); 0: each imports it itself   (1)
#
# Why not exec torchserve directly: `torchserve --foreground` is a Python launcher that starts the Java
# frontend as its child and dies on SIGTERM without stopping it; when the launcher (the container's
# main process) exits, the kernel SIGKILLs Java and its workers mid-request. So SIGTERM/SIGINT here
# stop the gRPC front (it drains its calls) and run `torchserve --stop`, which asks Java to shut down
# and waits (up to 60 s) for it to exit. If either server exits without being asked, the other one is
# stopped and the container exits non-zero, so restart policies and Kubernetes notice.
set -euo pipefail

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

APP_DIR="${APP_DIR:-/app}"
OIP_AGENT_JAR="${OIP_AGENT_JAR-$APP_DIR/oip/oip-agent.jar}"
OIP_GRPC_LISTEN="${OIP_GRPC_LISTEN-0.0.0.0:7070}"
PYTHON="${PYTHON:-python3}"

# The image's config and model store unless the caller passes its own (KServe: /mnt/models/...).
defaults=()
case " $* " in *" --ts-config "* | *" --ts-config="*) ;; *) defaults+=(--ts-config "$APP_DIR/config.properties") ;; esac
case " $* " in *" --model-store "* | *" --model-store="*) ;; *) defaults+=(--model-store "$APP_DIR/model_store") ;; esac
# The launcher reads TS_CONFIG_FILE before --ts-config: an inherited one would silently win.
unset TS_CONFIG_FILE

# Open Inference Protocol REST: TorchServe's OIP handler on (TS_OPEN_INFERENCE_PROTOCOL=oip) with our
# agent's replacement classes (serve/torchserve/agent.py builds the jar; `make serve` adds the same flag).
if [ -n "$OIP_AGENT_JAR" ]; then
    if [ ! -f "$OIP_AGENT_JAR" ]; then
        echo "entrypoint: OIP agent $OIP_AGENT_JAR not found (set OIP_AGENT_JAR= to run without it)" >&2
        exit 1
    fi
    export JDK_JAVA_OPTIONS="-javaagent:$OIP_AGENT_JAR${JDK_JAVA_OPTIONS:+ $JDK_JAVA_OPTIONS}"
    export TS_OPEN_INFERENCE_PROTOCOL=oip
fi

# The fork server (serve/torchserve/forkserver.py): it imports torch while Java starts; TorchServe's "python" is then
# serve/torchserve/worker_python, which has each backend worker forked from it (a plain Python when it cannot).
launcher=(torchserve)
fork_pid=
if [ "${FORK_WORKERS:-1}" != 0 ] && [ -f "$APP_DIR/serve/torchserve/torchserve/forkserver.py" ] && [ -x "$APP_DIR/serve/torchserve/torchserve/worker_python" ]; then
    export SERVE_FORKSERVER="${TMPDIR:-/tmp}/.ts.fork.sock" SERVE_WORKER_PYTHON
    SERVE_WORKER_PYTHON="$(command -v "$PYTHON")"
    env -u PYTHONPATH "$PYTHON" -P "$APP_DIR/serve/torchserve/torchserve/forkserver.py" --serve "$SERVE_FORKSERVER" &
    fork_pid=$!
    launcher=("$PYTHON" -c 'import sys; sys.executable = sys.argv.pop(1); from ts.model_server import start; start()'
              "$APP_DIR/serve/torchserve/torchserve/worker_python")
fi
stop_forkserver() {
    if [ -n "$fork_pid" ]; then kill -TERM "$fork_pid" 2>/dev/null || true; fi
}

# The gRPC front forwards to TorchServe's inference address; a wildcard host is reached via loopback.
inference="${TS_INFERENCE_ADDRESS:-http://127.0.0.1:8080}"
inference="${inference/\/\/0.0.0.0:/\/\/127.0.0.1:}"
OIP_GRPC_REST="${OIP_GRPC_REST:-$inference}"

# TorchServe writes key_file.json (the token-auth keys, when auth is on) into its working directory.
cd "${TS_WORKDIR:-/home/model-server}"

stopping=no
ts_pid=
grpc_pid=
stop_all() {
    stopping=yes
    echo "entrypoint: signal received, stopping the servers" >&2
    if [ -n "$grpc_pid" ]; then kill -TERM "$grpc_pid" 2>/dev/null || true; fi
    torchserve --stop --foreground || true
    stop_forkserver
}
trap stop_all TERM INT

"${launcher[@]}" --foreground --ncs \
    --log-config "$APP_DIR/docker/log4j2.xml" \
    "${defaults[@]}" "$@" &
ts_pid=$!

if [ -n "$OIP_GRPC_LISTEN" ] && [ "$OIP_GRPC_LISTEN" != off ]; then
    PYTHONPATH="$APP_DIR${PYTHONPATH:+:$PYTHONPATH}" \
        "$PYTHON" -m serve.oip_grpc --listen "$OIP_GRPC_LISTEN" --rest "$OIP_GRPC_REST" &
    grpc_pid=$!
fi

# Wait for the first of the two to end (or for a signal, which interrupts the wait).
status=0
finished=
wait -n -p finished $ts_pid $grpc_pid || status=$?
if [ "$stopping" = no ]; then
    if [ "$finished" = "$ts_pid" ]; then name=TorchServe; else name="the OIP gRPC front"; fi
    echo "entrypoint: $name exited on its own (status $status); stopping the rest" >&2
    trap - TERM INT
    if [ "$finished" = "$ts_pid" ]; then
        if [ -n "$grpc_pid" ]; then kill -TERM "$grpc_pid" 2>/dev/null || true; fi
    else
        torchserve --stop --foreground || true
    fi
    stop_forkserver
    wait || true
    # The launcher exits 0 whatever happened to Java: an unasked exit is a failure either way.
    [ "$status" -ne 0 ] || status=1
    exit "$status"
fi
# A signal interrupted the wait: collect both exit statuses (127: already reaped).
status=0
for pid in $ts_pid $grpc_pid; do
    code=0
    wait "$pid" 2>/dev/null || code=$?
    [ "$code" -eq 127 ] && code=0
    [ "$code" -eq 0 ] || status=$code
done
echo "entrypoint: servers stopped (status $status)" >&2
exit "$status"
