# care-q: `make setup` then `make test`. `make test` and `make demo` create .venv when missing.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
export CARE_Q_DATA ?= $(abspath ../shared/data)
SHARED  ?= $(abspath ../shared)
OUT     ?= out

.PHONY: setup test lint demo bench bench-quick wheel clean

$(BIN)/care-q: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

setup: $(BIN)/care-q

test: $(BIN)/care-q
	$(BIN)/python -m pytest -rs --durations=15 tests

lint: $(BIN)/care-q
	$(BIN)/ruff check care_q tests eval
	$(BIN)/lint-imports   # the layers in pyproject.toml [tool.importlinter]

demo: $(BIN)/care-q
	$(BIN)/care-q ptq --model care_s0 --weights $(SHARED)/models/care_s0_cifar10_64.pth \
	    --calib cifar10_train --num-calib 1000 --latency-runs 0 --fallback-synthetic --out $(OUT)/demo

bench: $(BIN)/care-q
	$(BIN)/pip install -q -e '.[aimet]' || echo "aimet-torch not installed: the bench records AIMET's row as a failure"
	$(BIN)/python -m care_q.bench.suite --suite eval/suite.yaml --shared $(SHARED) --out $(OUT)/bench \
	    --benchmarks eval/BENCHMARKS.md   # long (not a test); resumable: rerun after an interruption

bench-quick: $(BIN)/care-q
	$(BIN)/python -m care_q.bench.suite --quick --shared $(SHARED) --out $(OUT)/bench-quick

wheel: $(BIN)/care-q  # dist/care_q-*.whl, recipes and dataset definitions included (tests/test_packaging.py installs one)
	$(BIN)/pip wheel --no-deps --no-build-isolation -q -w dist .

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache build dist
