# pipeq developer targets. CI runs `make install`, `make docs`, `make lint`, `make typecheck` and `make test` (see .ci/run).
VENV ?= .venv
PYTHON ?= python3.11
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this machine; on a CUDA host the same pin takes PyPI's CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast test-gpu test-chaos gpu-bundle lint format typecheck check docs bench bench-quick bench-hostpath clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"

demo:
	HF_HUB_OFFLINE=1 $(VENV)/bin/pipeq demo

test:
	$(PY) -m pytest

test-fast:
	$(PY) -m pytest -m "not integration and not gpu"

test-gpu:
	$(PY) -m pytest -m gpu

# Minutes of repeated faults (a chaos loop of SIGKILLs), kept out of `make test`; CI runs it after the suite.
test-chaos:
	$(PY) -m pytest -m chaos

# What benchmarks/gpu_session.sh needs on a GPU machine with no network: .whl/ and .gpu/ (git-ignored).
gpu-bundle:
	PY=$(PY) bash benchmarks/gpu_bundle.sh

lint:
	$(VENV)/bin/ruff check pipeq migrations tests
	$(VENV)/bin/ruff format --check pipeq migrations tests

format:
	$(VENV)/bin/ruff format pipeq migrations tests
	$(VENV)/bin/ruff check --fix pipeq migrations tests

typecheck:
	$(VENV)/bin/mypy

check: lint typecheck test

# The manual (mkdocs.yml, docs/) into site/; --strict fails on a broken link, a missing page or a bad docstring reference.
docs:
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

bench:
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/run.py --results benchmarks/RESULTS.md

bench-quick:
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/run.py --quick

bench-hostpath:
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/hostpath.py

clean:
	rm -rf build dist site *.egg-info .pytest_cache .mypy_cache .ruff_cache pipeq.db pipeq.db-*
