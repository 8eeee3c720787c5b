# Two user-facing targets: `make demo` and `make test`. Both create .venv on first use
# and install everything the project needs (see README "Install").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mpcvit-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast lint install dataset proto bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch 2.13.0 (never a CUDA build, never torchvision).
	$(PIP) install -q torch==2.13.0
	# CrypTen declares sklearn/torchvision, which break; install it alone, then what it uses.
	$(PIP) install -q --no-deps crypten==0.4.1
	$(PIP) install -q -e '.[server,dev]'
	touch $(STAMP)

# Real Fashion-MNIST from Debian's dataset-fashion-mnist (needs root and apt).
dataset:
	@if [ -f $(FMNIST)/t10k-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST missing at $(FMNIST): install Debian's dataset-fashion-mnist (as root)" >&2; exit 1; \
	fi

demo: install dataset
	$(VENV)/bin/mpcvit demo

test: install dataset
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check .

proto: install
	$(PY) -m mpcvit.proto.build

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
