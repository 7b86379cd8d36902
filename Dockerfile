# syntax=docker/dockerfile:1
# Serving image: TorchServe 0.12 on Java 17 serving every model of this repository, as a non-root user,
# with the Open Inference Protocol REST surface (our Java agent) on 8080 and the OIP gRPC front on 7070:
# the same servers `make serve` runs. KServe runs this image too (deploy/kserve/servingruntime.yaml).
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
# here) -> oip (a JDK compiles the OIP agent jar against the venv's TorchServe) -> runtime (venv +
# archives + config + agent jar + serve/ for the gRPC front; no training data, weights or JDK).
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

# ----------------------------------------------------------------------------------------------- oip
# The Open Inference Protocol agent (serve/oip_agent.py: serve/java compiled against the venv's
# model-server.jar). The JDK stays in this stage; the runtime only needs the JRE.
FROM deps AS oip
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jdk-headless \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY serve/ serve/
RUN python -m serve.oip_agent --out /out/oip-agent.jar

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
COPY --from=oip /out/oip-agent.jar /app/oip/oip-agent.jar
# serve/ for the OIP gRPC front (python -m serve.oip_grpc, started by the entrypoint with PYTHONPATH=/app).
COPY serve/ /app/serve/
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

# Inference (REST) and the OIP gRPC front on all interfaces (publish them with -p); management and
# metrics stay on the container's loopback unless overridden, e.g. -e TS_METRICS_ADDRESS=http://0.0.0.0:8082.
# APP_DIR, OIP_AGENT_JAR and OIP_GRPC_LISTEN are read by deploy/docker/entrypoint.sh; TS_METRICS_CONFIG
# declares the handlers' model-quality metrics (serve/metrics.yaml; `serve start` passes the same file).
ENV PATH=/opt/venv/bin:$PATH \
    APP_DIR=/app \
    OIP_AGENT_JAR=/app/oip/oip-agent.jar \
    OIP_GRPC_LISTEN=0.0.0.0:7070 \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    TS_INFERENCE_ADDRESS=http://0.0.0.0:8080 \
    TS_MANAGEMENT_ADDRESS=http://127.0.0.1:8081 \
    TS_METRICS_ADDRESS=http://127.0.0.1:8082 \
    TS_METRICS_CONFIG=/app/serve/metrics.yaml \
    TS_WORKDIR=/home/model-server

USER 10001:10001
WORKDIR /home/model-server
EXPOSE 8080 7070

# Healthy = every archive in /app/model_store is registered with READY workers (not just /ping,
# which says Healthy before any worker is up). Stdlib Python: no curl in the image.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python3", "/app/docker/tsctl.py", "health"]

ENTRYPOINT ["/usr/bin/tini", "--", "/app/docker/entrypoint.sh"]
