# deepwatch: the README's two commands are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DEEPWATCH_DATA ?= $(abspath ../shared/data)
#: an index to take torch from (empty: pip's configured ones)
TORCH_INDEX ?=

.PHONY: setup demo test test-fast bench lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so that the package's `torch>=2.4` installs nothing more. Where pip
	# has a local CPU wheel (CI) it takes that; elsewhere PyPI's Linux torch is a multi-GB CUDA
	# build: `make TORCH_INDEX=https://download.pytorch.org/whl/cpu setup` asks for the CPU one.
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[serve,kafka,web,viz,spark,dev]'
	# the package's bytecode, as pip writes it for an installed (not editable) package: where
	# PYTHONDONTWRITEBYTECODE is set, every `deepwatch` command compiled its modules again
	$(BIN)/python -m compileall -q deepwatch
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/deepwatch demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 --timeout=900 --cov=deepwatch --cov-report=term

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not integration"

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out benchmarks/RESULTS.md

lint: $(STAMP)
	$(BIN)/ruff check deepwatch tests benchmarks
	$(BIN)/mypy deepwatch

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
