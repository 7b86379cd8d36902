#!/bin/bash
# Container entrypoint, run by tini (PID 1): the same `python -m serve start` as `make serve`, in the
# foreground (serve/server.py runs TorchServe with our OIP Java agent, the fork server; the agent also serves OIP gRPC inside the JVM,
# and stops them in order), with the image's config, model store and stdout logging.
#
#   (no arguments)      serve the image's config and model store
#   -*  (flags)         the same, with these torchserve flags; --ts-config / --model-store replace the
#                       image's (KServe's ServingRuntime passes the /mnt/models ones)
#   anything else       run that command instead (e.g. `bash`, `python3 /app/docker/tsctl.py key`)
#
# SIGTERM/SIGINT: `torchserve --stop` (its drain answers REST and gRPC calls in progress) (waiting for Java), then the fork server;
# exit 0. If TorchServe exits by itself, the fork server is stopped and the exit is non-zero
# (restart policies and Kubernetes notice). Plain `torchserve --foreground` as the main process would die
# on SIGTERM and take Java down with SIGKILL mid-request.
#
# Environment (defaults are the image's; deploy/kserve/servingruntime.yaml sets some of them):
#   APP_DIR             image layout root: config.properties, model_store/, docker/, serve/   (/app)
#   OIP_AGENT_JAR       the OIP Java agent; empty or "off": TorchServe's own partial OIP   ($APP_DIR/oip/oip-agent.jar)
#   OIP_GRPC_LISTEN     HOST:PORT of OIP gRPC (in the JVM); empty or "off": none        (0.0.0.0:7070)
#   SERVE_FORK_WORKERS  0: each backend worker imports torch itself instead of being forked   (1)
#   SERVE_FAST_WORKER   0: TorchServe's own worker loop (docs/torchserve-patches.md)   (1)
#   PYTHON              the Python that runs `serve`   (python3)
#   TS_WORKDIR          where TorchServe runs and writes key_file.json   (/home/model-server)
set -euo pipefail

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

APP_DIR="${APP_DIR:-/app}"
WORKDIR="${TS_WORKDIR:-/home/model-server}"
# The launcher reads TS_CONFIG_FILE before --ts-config: an inherited one would silently win.
unset TS_CONFIG_FILE
# `python -m serve` from the image's /app (serve/, client/).
cd "$APP_DIR"
exec "${PYTHON:-python3}" -m serve start --foreground --image --timeout 600 \
    --config "$APP_DIR/config.properties" --model-store "$APP_DIR/model_store" \
    --log-config "$APP_DIR/docker/log4j2.xml" \
    --workdir "$WORKDIR" --log-dir "$WORKDIR/logs" --tmpdir "${TMPDIR:-/tmp}" \
    -- "$@"
