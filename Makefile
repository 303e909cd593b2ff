# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.plm-installed
# llama-cpp-python compiles llama.cpp from source (~12 min on 2 cores); pip's wheel cache
# makes later set-ups on the same machine instant.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk, never a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,llama]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/plm demo

test: setup
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs
