# Cloud-Native Runtime Lab. `make book` builds the HTML book, `make test` runs every test and
# lab this machine can run; both set up what is missing first (see scripts/setup-system.sh).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXECUTE ?= 0
PYTEST_ARGS ?=

.PHONY: setup system apiserver book test lab lock bench doctor clean

setup: system $(STAMP) apiserver

system:
	@bash scripts/setup-system.sh

# The real Kubernetes API server code, built once from Debian's Go sources (minutes; cached).
apiserver: $(STAMP)
	@$(PY) -m helpers apiserver build

# Every Python package at the version and with the hashes of requirements.lock, then helpers
# editable (built by the locked setuptools, so nothing outside the lock is fetched).
$(STAMP): requirements.lock pyproject.toml
	@echo "setup: Python packages into $(VENV) from requirements.lock"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

# After editing requirements.txt: the whole dependency set again, pinned with hashes, from PyPI
# only (this machine's pip configuration may add local indexes, which the lock must not name).
# Versions already in the lock are kept where requirements.txt allows them.
lock: $(STAMP)
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND="make lock" \
	  $(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links -o requirements.lock requirements.txt pyproject.toml

book: setup
ifeq ($(EXECUTE),1)
	$(PY) -m helpers labs --execute
endif
	$(PY) -m helpers labs --check
	$(VENV)/bin/jupyter-book build . -W --keep-going

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lab: setup
	@bash scripts/lab.sh

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

doctor: setup
	@$(PY) -m helpers doctor

clean:
	rm -rf _build
