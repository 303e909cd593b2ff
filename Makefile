# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.plm-installed
# llama-cpp-python compiles llama.cpp from source (~10 min on 2 cores) once per machine:
# scripts/build_llama_wheel.sh caches the wheel (see there why not plain pip).

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk, never a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "$$(scripts/build_llama_wheel.sh $(PY))"
	$(PY) -m pip install -q -e ".[dev,llama,eval,hf,serve,test]"
	# native CPU kernels (about a minute on 2 cores; cached): without a compiler, PyTorch kernels run
	$(PY) -m plm kernels build || echo "plm: native kernels not built; the PyTorch kernels will run"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/plm demo

test: setup
	$(PY) -m pytest tests

# everything but the tests marked slow (training runs, subprocess CLIs, llama.cpp parity): a
# couple of minutes, for the edit-test loop; `make test` runs them all
test-fast: setup
	$(PY) -m pytest tests -m "not slow"

clean:
	rm -rf $(VENV) runs
