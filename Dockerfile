# syntax=docker/dockerfile:1
# Serving image: TorchServe 0.12 on Java 17 serving every model of this repository, as a non-root user.
# Full guide (run, token key, GPU, Kubernetes, KServe): deploy/README.md.
#
#   docker build -t torchserve-mnist .     (podman: add --format docker, else HEALTHCHECK is dropped)
#   docker run --rm -p 127.0.0.1:8080:8080 torchserve-mnist
#   KEY=$(docker exec <container> python3 /app/docker/tsctl.py key)
#   curl -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
#        -d '{"data": [...784 pixels in [0,1]...]}' http://127.0.0.1:8080/predictions/mnistnet
#
# Stages: deps (venv with requirements.txt) -> builder (weights + .mar archives; the ones already in
# the build context's weights/ and model_store/ are reused, anything missing is trained/packaged
# here) -> runtime (venv + archives + config only; no training data, weights or sources).
#
# BASE_IMAGE: any Debian/Ubuntu image with python3 (3.10+) and python3-venv, e.g. a CUDA runtime image
# for a GPU variant. The default image can already use NVIDIA GPUs: torch's PyPI wheel bundles its
# CUDA libraries, so `docker run --gpus all` is enough (deploy/README.md, "GPU").
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------- deps
FROM ${BASE_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

# ------------------------------------------------------------------------------------------- builder
FROM deps AS builder
WORKDIR /src
# .dockerignore lets in only what training and packaging read (plus existing weights/ and archives).
COPY . .
# Both steps skip work that is already done: present weights are not retrained, archives newer
# than their weights and sources are not rebuilt.
RUN python -m train all --missing --no-progress \
 && python -m serve.package \
 && chmod 0644 model_store/*.mar \
 && ls -l model_store/*.mar

# ------------------------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# Java 17 for the TorchServe frontend, tini as PID 1 (reaps zombies, forwards signals to the
# entrypoint). Unpinned on purpose: Debian's security updates replace these versions in place.
# /usr/share/man/man1 must exist for the JRE's postinst on slim images that strip man pages.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 model-server \
 && useradd --system --uid 10001 --gid model-server --create-home --home-dir /home/model-server \
        --shell /usr/sbin/nologin model-server

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /src/model_store/*.mar /app/model_store/
COPY deploy/docker/ /app/docker/
# The container config is the repository's config.properties plus one line that lets TorchServe's
# own TS_* environment variables (set below, or with `docker run -e`) override it.
COPY config.properties /app/config.properties.repo
RUN { grep -v '^enable_envvars_config=' /app/config.properties.repo; \
      echo; \
      echo '# Added by the Dockerfile: TS_* environment variables override this file.'; \
      echo 'enable_envvars_config=true'; } > /app/config.properties \
 && rm /app/config.properties.repo \
 && chmod 0755 /app/docker/entrypoint.sh

# Inference on all interfaces (publish it with -p); management and metrics stay on the container's
# loopback unless overridden, e.g. -e TS_METRICS_ADDRESS=http://0.0.0.0:8082 -p 127.0.0.1:8082:8082.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    TS_INFERENCE_ADDRESS=http://0.0.0.0:8080 \
    TS_MANAGEMENT_ADDRESS=http://127.0.0.1:8081 \
    TS_METRICS_ADDRESS=http://127.0.0.1:8082 \
    TS_WORKDIR=/home/model-server

USER 10001:10001
WORKDIR /home/model-server
EXPOSE 8080

# Healthy = every archive in /app/model_store is registered with READY workers (not just /ping,
# which says Healthy before any worker is up). Stdlib Python: no curl in the image.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python3", "/app/docker/tsctl.py", "health"]

ENTRYPOINT ["/usr/bin/tini", "--", "/app/docker/entrypoint.sh"]
