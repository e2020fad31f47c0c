# Each target installs what it needs into ./.venv first (idempotent, fast when already installed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
WORKDIR ?= workdirs/demo

.PHONY: demo test lint bench api install fashion-mnist clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package; install it when we may (root + apt).
fashion-mnist:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' or pass --config.data.dir=DIR"; exit 2; \
	  fi; \
	fi

demo: $(STAMP) fashion-mnist
	$(PY) -m tgeo_jax.demo --workdir=$(WORKDIR)

# The linter first (seconds), then the suite. --dist worksteal: an idle worker takes tests queued on the other (the
# tests' durations range from milliseconds to half a minute); one fresh-clone run each: 503 s against 532 s.
# More workers than cores gained nothing clear (one run each, 2026-12-07: -n 2 372 s, -n 3 358 s, -n 4 380 s; later
# that evening, after the GC tuning, on a machine that slowed by half: -n 2 316-404 s, -n 3 375 s). 2026-12-08, fresh
# clones alternated: 291 s and 274 s with XLA's one-module code generation for the suite (tests/conftest.py) and a
# shorter start-up timeout in one test, 308 s and 303 s without them.
test: lint
	$(PY) -m pytest -n 2 --dist worksteal tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The loss-math reference page, generated from the docstrings (tests/test_api_docs.py checks it is current).
api: $(STAMP)
	$(PY) docs/api_gen.py

bench: $(STAMP)
	$(PY) bench/step_cost.py

clean:
	rm -rf $(VENV) workdirs
