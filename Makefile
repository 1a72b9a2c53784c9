# Cloud-Native Runtime Lab. `make book` builds the HTML book, `make test` runs every test and
# lab this machine can run; both set up what is missing first (see scripts/setup-system.sh).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXECUTE ?= 0
PYTEST_ARGS ?=

.PHONY: setup system apiserver book test lab bench doctor clean

setup: system $(STAMP) apiserver

system:
	@bash scripts/setup-system.sh

# The real Kubernetes API server code, built once from Debian's Go sources (minutes; cached).
apiserver: $(STAMP)
	@$(PY) -m helpers apiserver build

$(STAMP): requirements.txt pyproject.toml
	@echo "setup: Python packages into $(VENV)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -e .
	@touch $@

book: setup
ifeq ($(EXECUTE),1)
	$(PY) -m helpers labs --execute
endif
	$(PY) -m helpers labs --check
	$(VENV)/bin/jupyter-book build . -W --keep-going

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lab: setup
	$(VENV)/bin/jupyter lab labs $(if $(filter 0,$(shell id -u)),--allow-root) --ip 127.0.0.1

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

doctor: setup
	@$(PY) -m helpers doctor

clean:
	rm -rf _build
