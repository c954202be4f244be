# recdistill: the two commands a new user types are `make run` and `make test`.
# Both create .venv and install everything first (idempotent: re-runs only when pyproject.toml changes).

PYTHON     ?= python3
VENV       ?= .venv
# The CPU wheel of torch; on a CUDA machine use e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index of your choice.
TORCH_SPEC ?= torch==2.13.0
CONFIG     ?= configs/tiny.yaml
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.recdistill-installed

.PHONY: setup run test test-all test-slow test-unit test-integration bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@# libaio: DeepSpeed's async I/O for NVMe offload (ZeRO-Infinity). Installed when apt-get can (root or sudo).
	@dpkg -s libaio-dev >/dev/null 2>&1 || { command -v apt-get >/dev/null && \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq libaio-dev >/dev/null; } ; } || \
	  echo "setup: libaio-dev not installed: NVMe offload (deepspeed.offload_*=nvme) will be refused by the plan"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,s3]'
	$(BIN)/python -m cluster.warmup
	touch $@

## Run the whole pipeline end to end on $(CONFIG) (default: the embedded synthetic dataset).
run: setup
	$(BIN)/recdistill pipeline --config $(CONFIG)

## The test suite (unit + integration) within its 20-minute budget: all but the `slow` scenarios.
test: setup
	$(BIN)/pytest -q -m "not slow" --durations=10

## Everything, the slow multi-run scenarios included (~35 min on 2 cores).
test-all: setup
	$(BIN)/pytest -q --durations=15

test-slow: setup
	$(BIN)/pytest -q -m slow

test-unit: setup
	$(BIN)/pytest -q -m "not integration"

test-integration: setup
	$(BIN)/pytest -q -m integration

## Benchmarks: print tables, write JSON under bench/results/.
bench: setup
	$(BIN)/python -m bench.run_all

clean:
	rm -rf runs .pytest_cache
