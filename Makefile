# One-command entry points. `make train` and `make test` work on a fresh machine with Python >= 3.10.
PY ?= python3
VENV ?= .venv
# torch/torchvision are pinned to the builds this project is tested with; override for your CUDA.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup fashion-mnist train test lint format docs clean

setup: $(VENV)/.installed fashion-mnist

# Fashion-MNIST (the real 70k images of the *_fashion_mnist experiments) from Debian's package, where
# apt-get is there and we are root. Best effort: without it those experiments stop with the install
# command and their tests skip.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
fashion-mnist:
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) \
			>/dev/null 2>&1 || echo "make: could not install dataset-fashion-mnist; its tests will skip"; \
	else \
		echo "Fashion-MNIST not installed (its tests skip): sudo apt-get install dataset-fashion-mnist"; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[dev,docs]'
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

# The documentation site (docs/ + mkdocs.yml) into site/; --strict: a broken link or missing page fails.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf runs site .pytest_cache .ruff_cache
