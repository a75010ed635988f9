# Two entry points for a fresh Debian machine: `make demo` and `make test`.
# Both set everything up first (Debian packages, then .venv with the package editable).
# Debian's python3 (built with PGO and LTO: a fifth fewer instructions than a plain source build,
# which matters for a CLI whose short runs are mostly start-up); PY=... picks another.
PY ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)
	@scripts/install-system-deps
	@# bytecode for every module now: a shell with PYTHONDONTWRITEBYTECODE set would otherwise
	@# leave short `coco` runs compiling what changed since the last cached bytecode, every time
	@$(BIN)/python -m compileall -q src

$(STAMP): pyproject.toml
	@scripts/install-system-deps
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip uninstall -q -y coco 2>/dev/null || true  # the old distribution name
	@$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: setup
	@$(BIN)/python scripts/demo.py

test: setup
	@$(BIN)/python -m pytest -q tests

lint: setup
	@$(BIN)/ruff check src tests benchmarks scripts
	@$(BIN)/ruff format --check src tests benchmarks scripts

format: setup
	@$(BIN)/ruff format src tests benchmarks scripts
	@$(BIN)/ruff check --fix src tests benchmarks scripts

bench: setup
	@for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
