# Two user-facing targets: `make demo` and `make test`. Both create .venv on first use
# and install everything the project needs (see README "Install").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mpcvit-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast lint install dataset kubectl tcpdump proto bench clean

install: $(STAMP)

# Each step says what it does; pip stays quiet (-q) but still prints its errors.
# CrypTen comes with --no-deps: its metadata declares sklearn, torchvision, pandas,
# tensorboard and future, which it never imports here (torchvision would pull a second
# torch); the `server` extra brings what it really imports.  pip would report those
# declarations as conflicts on every later install, so step 3 does not warn about
# conflicts and step 5 runs `pip check`, printing every conflict except those.
# PYTHONWARNINGS drops setuptools' notice that an editable install of a remapped layout
# (mpc/ -> mpcvit.mpc, ...) goes through an import hook: informational, not a problem.
$(STAMP): pyproject.toml Makefile
	@echo "[1/5] creating $(VENV) and updating pip"
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@echo "[2/5] torch 2.13.0, CPU build (about 200 MB: the longest step)"
	@$(PIP) install -q torch==2.13.0
	@echo "[3/5] mpcvit (editable) with the server, image and dev extras"
	@PYTHONWARNINGS="ignore:Editable installation" \
		$(PIP) install -q --no-warn-conflicts -e '.[server,image,dev]'
	@echo "[4/5] crypten 0.4.1 without its declared dependencies (see the Makefile)"
	@$(PIP) install -q --no-deps crypten==0.4.1
	@echo "[5/5] checking dependencies and that the client, servers and CrypTen import"
	@$(PIP) check | grep -v '^crypten 0.4.1 requires' || true
	@$(PY) -c "import mpcvit.party.client, mpcvit.party.server, PIL; \
	from mpcvit.mpc.compat import import_crypten; import_crypten()"
	@touch $(STAMP)
	@echo "installed: $(VENV)/bin/mpcvit (make demo, make test)"

# Real Fashion-MNIST from Debian's dataset-fashion-mnist (needs root and apt).
dataset:
	@if [ -f $(FMNIST)/t10k-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST missing at $(FMNIST): install Debian's dataset-fashion-mnist (as root)" >&2; exit 1; \
	fi

# kubectl renders the Kubernetes overlays offline (tests/test_k8s.py): Debian's kubectl
# package (Debian 13 and later; needs root and apt).  Debian 12 has none recent enough (its
# kubernetes-client 1.20 embeds kustomize v2): there, or without root, the render tests
# skip and say why.
kubectl:
	@if command -v kubectl >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq; \
		if apt-cache show kubectl >/dev/null 2>&1; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl; \
		else echo "no kubectl package in this Debian: the Kubernetes render tests will skip" >&2; fi; \
	else \
		echo "kubectl missing: install Debian's kubectl (as root) to run the render tests" >&2; \
	fi

# tcpdump captures loopback traffic during a request (tests/test_party_roles.py checks that
# no image or logits encoding crosses the wire).  Debian's tcpdump (needs root and apt);
# without it, or without the right to capture, that test skips and says why.
tcpdump:
	@if command -v tcpdump >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tcpdump; \
	else \
		echo "tcpdump missing: install Debian's tcpdump (as root) to run the capture test" >&2; \
	fi

demo: install dataset
	$(VENV)/bin/mpcvit demo

test: install dataset kubectl tcpdump
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: install kubectl
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check .

proto: install
	$(PY) -m mpcvit.proto.build

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
