# syntax=docker/dockerfile:1
# Serving image: TorchServe 0.12 on Java 17 serving every model of this repository, as a non-root user,
# with the Open Inference Protocol REST surface (our Java agent) on 8080 and OIP gRPC (in the same JVM) on 7070:
# the same servers and config `make serve` runs. KServe runs this image too (deploy/kserve/servingruntime.yaml).
# Full guide (run, token key, GPU image, Kubernetes, KServe): deploy/README.md.
#
#   make image      (= podman/docker build with the flags below; tests/container/ builds and runs it in `make test`)
#   docker build -t torchserve-mnist:cpu .     (podman: add --format docker, else HEALTHCHECK is dropped)
#   docker run --rm -p 127.0.0.1:8080:8080 -p 127.0.0.1:7070:7070 torchserve-mnist:cpu
#   KEY=$(docker exec <container> python3 /app/docker/tsctl.py key)
#   curl -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
#        -d '{"data": [...784 pixels in [0,1]...]}' http://127.0.0.1:8080/predictions/mnistnet
#
# CPU image by default (~1.3 GB): torch's CPU-only wheel from PyTorch's own index. GPU image, same file:
#   docker build --build-arg TORCH_SPEC=torch==2.14.1 --build-arg TORCH_INDEX_URL= -t torchserve-mnist:gpu .
# (PyPI's torch bundles its CUDA libraries: ~6.6 GB; run it with --gpus all. deploy/README.md, "GPU image".)
#
# Stages, ordered so that a code-only change rebuilds only the small layers at the end:
#   deps    venv: torch (TORCH_SPEC) then requirements-serve.txt (serving only: no training/packaging tools)
#   builder deps + torch-model-archiver: weights + .mar archives (the ones already in the build context's
#           weights/ and model_store/ are reused; anything missing is trained/packaged here)
#   oip     a JDK compiles the OIP agent jar against the venv's TorchServe
#   runtime base + tini + oip's jlink'ed JRE + deps' venv + archives + agent jar + config + serve/, client/
#           and wire/ (`python -m serve start`, as on the host) + deploy/docker/
#
# BASE_IMAGE: any Debian/Ubuntu image with python3 (3.10+) and python3-venv (e.g. a CUDA runtime image).
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------- deps
FROM ${BASE_IMAGE} AS deps
# TORCH_SPEC: the torch requirement. TORCH_INDEX_URL: an extra pip index for it (empty: pip's own indexes
# only, e.g. PyPI for the CUDA build, or a local wheel folder that already holds the CPU wheel).
ARG TORCH_SPEC=torch==2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, in its own layer: the largest download, and it changes least. Then strip what serving never
# loads: C++ headers, torch's own test suite and test binaries (~180 MB; torch_shm_manager stays).
# hadolint ignore=DL3013
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" \
 && site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && rm -rf "$site/torch/include" "$site/torch/test" "$site"/torch/bin/test_* "$site"/torch/bin/protoc* \
 && python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
COPY requirements-serve.txt /tmp/requirements-serve.txt
RUN pip install -r /tmp/requirements-serve.txt \
 && python -c 'import torch, ts, captum.attr, yaml, PIL, psutil, requests'

# ------------------------------------------------------------------------------------------- builder
FROM deps AS builder
# The packaging tool, at its pin in requirements.txt (training and packaging only: not in the runtime).
COPY requirements.txt /tmp/requirements.txt
# hadolint ignore=DL3013
RUN pip install "$(grep -E '^torch-model-archiver==' /tmp/requirements.txt)"
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
# The Open Inference Protocol agent (serve/torchserve/agent.py: serve/torchserve/java compiled against the
# venv's model-server.jar). The JDK stays in this stage; the runtime only needs the JRE.
FROM deps AS oip
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jdk-headless \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the agent build reads, so a change elsewhere in serve/ does not recompile it.
COPY paths/ paths/
COPY serve/__init__.py serve/
COPY serve/torchserve/__init__.py serve/torchserve/agent.py serve/torchserve/
COPY serve/torchserve/java/ serve/torchserve/java/
RUN python -m serve.torchserve.agent --out /out/oip-agent.jar
# The runtime's Java: a jlink'ed JRE of just the modules TorchServe's frontend uses (`jdeps
# --print-module-deps` of ts/frontend/model-server.jar), plus java.instrument (the agent), jdk.crypto.ec (TLS),
# jdk.management and jdk.zipfs: ~50 MB where Debian's openjdk-17-jre-headless is ~350 MB with its libraries.
RUN jlink --add-modules java.base,java.compiler,java.desktop,java.instrument,java.management.rmi,java.naming,\
java.prefs,java.scripting,java.sql,jdk.crypto.ec,jdk.management,jdk.sctp,jdk.unsupported,jdk.zipfs \
        --strip-java-debug-attributes --no-man-pages --no-header-files --compress=2 --output /out/jre \
 && /out/jre/bin/java -version

# ------------------------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# tini as PID 1 (reaps zombies, forwards signals to the entrypoint); procps for /bin/kill, which TorchServe runs
# (`kill -9 <pid>`) to stop a scaled-down or unregistered version's workers: without it every unregister fails
# ("Interrupted while cleaning resources") and a rollout cannot retire the old version. Unpinned on purpose: Debian's security
# updates replace it in place. apt-get clean: base images without docker's apt hook keep the .debs otherwise.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini procps \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 model-server \
 && useradd --system --uid 10001 --gid model-server --create-home --home-dir /home/model-server \
        --shell /usr/sbin/nologin model-server

# Layers from the one that changes least to the one that changes most: a code-only change rebuilds
# the last few (archives, serve/, deploy/docker/), never the venv or the JRE.
COPY --from=oip /out/jre /opt/java
COPY --from=deps /opt/venv /opt/venv
# The container config is the repository's config.properties plus one line that lets TorchServe's
# own TS_* environment variables (set below, or with `docker run -e`) override it.
COPY config.properties /app/config.properties.repo
RUN { grep -v '^enable_envvars_config=' /app/config.properties.repo; \
      echo; \
      echo '# Added by the Dockerfile: TS_* environment variables override this file.'; \
      echo 'enable_envvars_config=true'; } > /app/config.properties \
 && rm /app/config.properties.repo
COPY --from=oip /out/oip-agent.jar /app/oip/oip-agent.jar
COPY --from=builder /src/model_store/*.mar /app/model_store/
# `python -m serve rollout|rollback` records the default it promotes in <store>/.rollout/ (a restart serves it):
# writable by the image's user here; a mounted store must be writable by uid 10001 (deploy/README.md).
RUN install -d -o 10001 -g 10001 -m 0755 /app/model_store/.rollout
# serve/ (with serve/torchserve/: the patches, fork server and worker launch), the client it asks the
# management API with, paths/ (the repository layout) and wire/ (the OIP codec and
# the [METRICS] lines): the entrypoint runs `python -m serve start --foreground --image` from /app.
COPY paths/ /app/paths/
COPY wire/ /app/wire/
COPY client/ /app/client/
COPY serve/ /app/serve/
# The rollout's quality gate (`podman exec -w /app <ctr> python -m serve rollout <m> V`): the model registry, the
# data loader and the held-out MNIST test set (1.6 MB; the training split stays out).
COPY models/ /app/models/
COPY train/__init__.py train/data.py /app/train/
COPY data/mnist/SHA256SUMS /app/data/mnist/
COPY data/mnist/MNIST/raw/t10k-images-idx3-ubyte.gz data/mnist/MNIST/raw/t10k-labels-idx1-ubyte.gz \
     /app/data/mnist/MNIST/raw/
# entrypoint.sh is committed executable (mode 100755); COPY keeps the mode.
COPY deploy/docker/ /app/docker/

# Inference (REST) and OIP gRPC on all interfaces (publish them with -p); management and
# metrics stay on the container's loopback unless overridden, e.g. -e TS_METRICS_ADDRESS=http://0.0.0.0:8082.
# APP_DIR is read by deploy/docker/entrypoint.sh, OIP_AGENT_JAR and OIP_GRPC_LISTEN by `serve start`;
# TS_METRICS_CONFIG declares the handlers' model-quality metrics (serve/metrics.yaml, as on the host).
ENV PATH=/opt/venv/bin:/opt/java/bin:$PATH \
    JAVA_HOME=/opt/java \
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
