# make demo: train TiTok-tiny and MsTok-tiny on bundled photos and write runs/demo/report.md
# make test: lint (ruff) and the whole test suite (two pytest-xdist workers, one torch thread each)
# make test-quick: lint and the tests not marked slow (pytest -m "not slow")
# Both create .venv when missing. Torch is installed only when none is importable there;
# TORCH_SPEC picks it (default: the CPU build torch==2.13.0), e.g. for a GPU machine:
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mstok-installed

.PHONY: install demo test test-quick lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/mstok demo

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

test: lint
	$(PY) -m pytest -q -n 2 --dist load --maxschedchunk 1

test-quick: lint
	$(PY) -m pytest -q -n 2 --dist load --maxschedchunk 1 -m "not slow"

bench: install
	$(PY) benchmarks/flops_vs_tokens.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
