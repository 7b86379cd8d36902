#!/usr/bin/env bash
# Container smoke test: build the serving image, run it like Kubernetes would (non-root, read-only root
# filesystem, only the inference port published on loopback), wait until healthy, classify real MNIST
# test digits with the token key read out of the container, stop it with SIGTERM, and clean up.
# Prints how long each step took and the image size.
#
#   scripts/container-smoke.sh              build (reusing the layer cache) then test
#   scripts/container-smoke.sh --no-build   test an image built earlier
#
# Environment (defaults): IMAGE (localhost/torchserve-mnist:smoke), HOST_PORT (18085),
#   READY_TIMEOUT seconds (600), CONTAINER_SETUP (../shared/tools/container-setup: installs podman and a
#   local python:3.11-slim on machines without a container engine; skipped when absent),
#   REMOVE_IMAGE=1 to delete the image afterwards (it is ~6 GB; kept by default for the layer cache).
# Needs podman (or docker) and python3 on the host. Exit status 0 only if every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/torchserve-mnist:smoke}
HOST_PORT=${HOST_PORT:-18085}
READY_TIMEOUT=${READY_TIMEOUT:-600}
CONTAINER_SETUP=${CONTAINER_SETUP:-../shared/tools/container-setup}
BUILD=yes
case "${1:-}" in
    --no-build) BUILD=no ;;
    "") ;;
    *) echo "usage: $0 [--no-build]" >&2; exit 2 ;;
esac

log() { printf '[container-smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() { log "FAIL: $*"; exit 1; }
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python

# --- engine ---------------------------------------------------------------------------------------
build_args=()
if [ -f "$CONTAINER_SETUP" ]; then
    log "preparing podman with $CONTAINER_SETUP"
    setup_out=$(bash "$CONTAINER_SETUP")
    # The setup prints its build command; keep its read-only wheel-folder mounts (-v a:b:ro).
    read -r -a mounts <<<"$(grep '^Build:' <<<"$setup_out" | grep -o -- '-v [^ ]*' | tr '\n' ' ')"
    build_args=(--pull=never --network=host "${mounts[@]}")
fi
if command -v podman >/dev/null; then
    ENGINE=podman
    # podman's default OCI image format has no HEALTHCHECK: build Docker-format images.
    build_args+=(--format docker)
elif command -v docker >/dev/null; then ENGINE=docker
else fail "no podman or docker on PATH"; fi

# --- build ----------------------------------------------------------------------------------------
if [ "$BUILD" = yes ]; then
    log "building $IMAGE with $ENGINE (first build: ~10+ min, torch alone is ~5.6 GB)"
    t0=$(date +%s)
    "$ENGINE" build "${build_args[@]}" -t "$IMAGE" . >/tmp/container-smoke-build.log 2>&1 \
        || { tail -n 40 /tmp/container-smoke-build.log; fail "image build failed (log: /tmp/container-smoke-build.log)"; }
    log "build took $(( $(date +%s) - t0 )) s"
fi
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE") || fail "no image $IMAGE (build it first)"
log "image $IMAGE: $(( size / 1000000 )) MB"

# --- run ------------------------------------------------------------------------------------------
cid=""
cleanup() { [ -n "$cid" ] && "$ENGINE" rm -f "$cid" >/dev/null 2>&1 || true; }
trap cleanup EXIT
# Writable tmpfs for the server's uid (podman 4 ignores tmpfs mode=, its U option chowns instead).
home_opts=rw,mode=1777
[ "$ENGINE" = podman ] && home_opts=rw,U
t0=$(date +%s)
cid=$("$ENGINE" run -d -p "127.0.0.1:${HOST_PORT}:8080" \
        --read-only --tmpfs /tmp:rw,mode=1777 --tmpfs "/home/model-server:${home_opts}" \
        "$IMAGE")
log "container ${cid:0:12} started; waiting for every model to be READY (HEALTHCHECK command)"
health() {  # the image's HEALTHCHECK (docker has no `healthcheck run`: exec the same command)
    if [ "$ENGINE" = podman ]; then "$ENGINE" healthcheck run "$cid"
    else "$ENGINE" exec "$cid" python3 /app/docker/tsctl.py health; fi
}
until out=$(health 2>&1); do
    case "$out" in *"no defined healthcheck"*) fail "the image has no HEALTHCHECK (podman: build with --format docker)" ;; esac
    [ "$("$ENGINE" inspect --format '{{.State.Running}}' "$cid")" = true ] \
        || { "$ENGINE" logs --tail 40 "$cid"; fail "container exited before becoming healthy"; }
    (( $(date +%s) - t0 < READY_TIMEOUT )) \
        || { "$ENGINE" logs --tail 40 "$cid"; fail "not healthy after ${READY_TIMEOUT} s: $out"; }
    sleep 3
done
log "healthy after $(( $(date +%s) - t0 )) s: $("$ENGINE" exec "$cid" python3 /app/docker/tsctl.py health)"
"$ENGINE" exec "$cid" id | grep -q 'uid=10001' || fail "the server does not run as uid 10001"

# --- predict --------------------------------------------------------------------------------------
key=$("$ENGINE" exec "$cid" python3 /app/docker/tsctl.py key inference)
log "inference key read from the container (key_file.json)"
"$PY" - "$HOST_PORT" "$key" <<'PYEOF' || fail "prediction checks failed"
"""Send real MNIST test digits (data/mnist, verified copy) and check the served classifications."""
import gzip, json, sys, urllib.error, urllib.request

port, key = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}/predictions/mnistnet"
count = 20
with gzip.open("data/mnist/MNIST/raw/t10k-images-idx3-ubyte.gz") as f:
    pixels = f.read()[16:16 + count * 784]
with gzip.open("data/mnist/MNIST/raw/t10k-labels-idx1-ubyte.gz") as f:
    labels = list(f.read()[8:8 + count])
images = [[b / 255 for b in pixels[i * 784:(i + 1) * 784]] for i in range(count)]

def post(body, with_key=True):
    headers = {"Content-Type": "application/json"}
    if with_key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")

status, body = post({"data": images[0]}, with_key=False)
assert status in (400, 401), f"a request without the key must be refused, got {status}: {body}"
print(f"  without key: HTTP {status} (token auth is on)")

status, one = post({"data": images[0]})
assert status == 200, f"HTTP {status}: {one}"
assert one["predicted_class"] == labels[0], f"test digit 0 is a {labels[0]}, served {one}"
assert abs(sum(one["probabilities"]) - 1) < 1e-3, one
print(f"  test digit 0 (a {labels[0]}): predicted {one['predicted_class']}, "
      f"p={max(one['probabilities']):.3f}")

status, many = post({"data": images})
assert status == 200 and len(many) == count, f"HTTP {status}: {many}"
predicted = [answer["predicted_class"] for answer in many]
correct = sum(p == t for p, t in zip(predicted, labels))
print(f"  first {count} test digits: {correct}/{count} correct (labels {labels}, predicted {predicted})")
assert correct >= count - 1, "a trained MNIST net gets at most one of these 20 wrong"
PYEOF
log "predictions OK"

# --- stop -----------------------------------------------------------------------------------------
t0=$(date +%s)
"$ENGINE" stop -t 60 "$cid" >/dev/null
stop_s=$(( $(date +%s) - t0 ))
code=$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$cid")
log "stopped by SIGTERM in ${stop_s} s, exit code $code"
[ "$code" = 0 ] || { "$ENGINE" logs --tail 30 "$cid"; fail "exit code $code after SIGTERM (expected a clean 0)"; }
logs=$("$ENGINE" logs "$cid" 2>&1)
grep -q "Model server started" <<<"$logs" || fail "no TorchServe start-up line in the container's output"
grep -q "entrypoint: TorchServe stopped" <<<"$logs" || fail "SIGTERM did not go through torchserve --stop"

cleanup; cid=""
if [ "${REMOVE_IMAGE:-0}" = 1 ]; then "$ENGINE" rmi "$IMAGE" >/dev/null && log "removed $IMAGE"; fi
log "PASS"
