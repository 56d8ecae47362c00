# Two commands on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines pin this torch (a local CPU wheel here; elsewhere add TORCH_INDEX=https://download.pytorch.org/whl/cpu).
# GPU users: install your CUDA torch into the venv first and run `make test TORCH_SPEC=`.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
# `make test` runs what a contributor needs and skips tests marked slow; `make test SLOW=1` (CI) runs them all
SLOW ?=
# the tested versions (constraints.txt); `make install-dev CONSTRAINTS=` installs from pyproject's ranges only
CONSTRAINTS ?= constraints.txt
DEMO_OUT ?= demo-out
# e.g. make demo DEMO_ARGS="--samples ~/my-photos" (<person>/<photo>, optional group/ + labels.json)
DEMO_ARGS ?=

.PHONY: demo test install install-dev lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.core: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(CONSTRAINTS) | $(PY)
	@if [ -n "$(TORCH_SPEC)" ] && ! $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),); fi
	DS_BUILD_OPS=0 $(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS),) -e ".[all,dev,deepspeed]"
	touch $(VENV)/.core $@

install: $(VENV)/.core

install-dev: $(VENV)/.dev

demo: $(VENV)/.core
	$(VENV)/bin/withanyone demo --out $(DEMO_OUT) $(DEMO_ARGS)

test: $(VENV)/.dev
	$(PY) -m pytest $(if $(SLOW),,-m "not slow") $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(VENV)/.dev
	for b in benchmarks/*.py; do $(PY) $$b $$([ $$b = benchmarks/mini.py ] && echo --smoke) || exit 1; done  # mini's default (--quick) is ~20 min

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build dist src/*.egg-info
