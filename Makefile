# The pipeline, one target a stage: models → train → model_store → handlers → serve.
#   make serve   set up .venv, train what is missing, package every model, start TorchServe (README step 1)
#   make test    set up .venv and run every test (README step 2; .ci/run calls exactly this)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup train package serve stop status test image bench bench-sweep gpu-check clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-serve.txt requirements-dev.txt pyproject.toml
	@command -v javac >/dev/null || { echo "TorchServe needs Java 17, and its OIP agent (serve/torchserve/java) a JDK: install it first (Debian: apt-get install -y openjdk-17-jdk-headless)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

train: setup
	$(PY) -m train all --missing

package: train
	$(PY) -m serve.package

serve: package
	$(PY) -m serve start

stop:
	$(PY) -m serve stop

status:
	$(PY) -m serve status

# pytest exits 5 when it collects no tests: accepted only when PYTEST_ARGS selects tests (-k, -m, a node id or
# path) and that selection is empty; a plain `make test` (CI) that runs nothing fails.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS) || { rc=$$?; selects=no; \
	  for arg in $(PYTEST_ARGS); do case "$$arg" in -k*|-m*|*::*) selects=yes;; -*) ;; *) [ -e "$$arg" ] && selects=yes;; esac; done; \
	  if [ $$rc -eq 5 ] && [ $$selects = yes ]; then echo "pytest: PYTEST_ARGS selected no tests"; else exit $$rc; fi; }

# The CPU serving image torchserve-mnist:cpu with podman or docker (tests/container/container_image.py finds the
# engine; `make test` builds and runs it too). IMAGE_ARGS=--gpu: the CUDA image torchserve-mnist:gpu.
image: package
	$(PY) tests/container/container_image.py $(IMAGE_ARGS)

# Serving benchmark: ours vs tuned stock TorchServe vs LitServe vs Triton vs in-process, with the goal ratios
# (bench/README.md; needs wrk). Triton runs from build/triton-venv, which this makes first (fails if it cannot).
# bench-sweep: the size sweep (1-1,024 images per request) and the gRPC load of bench/README.md "Data path".
bench: setup
	$(PY) -m bench.triton_server --setup
	$(PY) -m bench.serving $(BENCH_ARGS)

bench-sweep: setup
	$(PY) -m bench.triton_server --setup
	$(PY) -m bench.sweep $(SWEEP_ARGS)
	$(PY) -m bench.grpcload

# GPU check (scripts/gpu_check/, README "GPU check"): handlers on the GPU in process and, with Java, TorchServe's
# GPU workers; parity with the CPU and throughput. Without a GPU it says so and exits 0. GPU_CHECK_ARGS: its options.
gpu-check: setup
	$(PY) -m scripts.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf weights model_store/*.mar build logs
