# medunet — set-up, demo and tests. `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch is pinned to the CPU wheel on local disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv demo test test-all lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_PIN)"
	$(PIP) install --quiet -e '.[dev]'
	$(PY) -c "import torch, monai, medunet; print('medunet', medunet.__version__, '| torch', torch.__version__, '| monai', monai.__version__)"
	touch $(STAMP)

demo: venv
	$(PY) scripts/demo.py

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check medunet tests scripts

format: venv
	$(PY) -m ruff format medunet tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_output *.egg-info
