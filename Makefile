# One-command entry points. `make train` and `make test` work on a fresh machine with Python >= 3.10.
PY ?= python3
VENV ?= .venv
# torch/torchvision are pinned to the builds this project is tested with; override for your CUDA.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup train test lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

train: setup
	$(VENV)/bin/lgen train

test: setup
	$(VENV)/bin/pytest -q --durations=15

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs .pytest_cache .ruff_cache
