#!/bin/sh
# Container entrypoint, run by tini (PID 1): TorchServe in the foreground, logging to stdout.
#
#   (no arguments)      torchserve --foreground with the image's config, model store and log config
#   -*  (flags)         the same, with these extra torchserve flags appended (e.g. --models mnistnet.mar)
#   anything else       run that command instead (e.g. `bash`, `python3 /app/docker/tsctl.py key`)
#
# Why not exec torchserve directly: `torchserve --foreground` is a Python launcher that starts the Java
# frontend as its child and dies on SIGTERM without stopping it; when the launcher (the container's
# main process) exits, the kernel SIGKILLs Java and its workers mid-request. So SIGTERM/SIGINT here
# become `torchserve --stop`, which asks Java to shut down and waits (up to 60 s) for it to exit.
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

# TorchServe writes key_file.json (the token-auth keys) into its working directory.
cd "${TS_WORKDIR:-/home/model-server}"

stopping=no
stop_server() {
    stopping=yes
    echo "entrypoint: signal received, stopping TorchServe" >&2
    torchserve --stop --foreground || true
}
trap stop_server TERM INT

torchserve --foreground --ncs \
    --ts-config /app/config.properties \
    --model-store /app/model_store \
    --log-config /app/docker/log4j2.xml \
    "$@" &
server=$!

status=0
wait "$server" || status=$?
if [ "$stopping" = no ]; then
    # Nobody asked it to stop (a crash, an OOM exit): fail, so restart policies see a failure even
    # though the launcher itself exits 0 whatever happened to Java.
    echo "entrypoint: TorchServe exited on its own (launcher status $status)" >&2
    [ "$status" -ne 0 ] || status=1
    exit "$status"
fi
# The signal interrupted the first wait; collect the launcher's own exit status.
status=0
wait "$server" 2>/dev/null || status=$?
[ "$status" -ne 127 ] || status=0  # 127: already reaped while stop_server ran
echo "entrypoint: TorchServe stopped (status $status)" >&2
exit "$status"
