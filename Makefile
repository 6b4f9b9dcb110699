# Two commands do all the set-up on a fresh machine:
#   make serve   create .venv if needed, install, run the coordinator on its default configuration
#   make test    the same set-up, then the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH_DEV ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_DEV)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,tools]'
	touch $(STAMP)

serve: $(STAMP)
	exec $(VENV)/bin/kvbm-shm serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
