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

# everything CI runs: the main suite and the real MONAI Label server test
test-all: test test-label

lint: venv
	$(PY) -m ruff check medunet tests scripts

format: venv
	$(PY) -m ruff format medunet tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_output *.egg-info

# --- MONAI Label (issue 6) ---------------------------------------------------------------------------
# The label server runs in its own venv: monailabel needs a real torchvision, which does not import
# beside the CPU torch 2.13.0 of .venv. scripts/setup_label_env.sh installs torch 2.14.1 + torchvision
# 0.29.1 (local disk), monailabel 0.8.5 (--no-deps + its runtime deps) and medunet (editable).
LABEL_VENV  := .venv-label
LABEL_STAMP := $(LABEL_VENV)/.installed

.PHONY: label test-label clean-label

label: $(LABEL_STAMP)

$(LABEL_STAMP): scripts/setup_label_env.sh pyproject.toml
	PYTHON=$(PYTHON) bash scripts/setup_label_env.sh $(LABEL_VENV)

# real server on 127.0.0.1; MEDUNET_REQUIRE_LABEL=1 turns a missing .venv-label into a failure
test-label: venv label
	MEDUNET_REQUIRE_LABEL=1 $(PY) -m pytest -q -m label tests/test_label_server.py $(PYTEST_ARGS)

clean-label:
	rm -rf $(LABEL_VENV)
