# Two commands do all the set-up on a fresh machine:
#   make simulate   # virtual environment + packages + the default local simulation
#   make test       # virtual environment + packages + the test suite (what CI runs)
VENV    ?= .venv
PYTHON  ?= python3
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: install simulate test test-fast test-load lint results clean

install: $(VENV)/.fedlora-installed

$(VENV)/.fedlora-installed: pyproject.toml scripts/setup-venv.sh
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/setup-venv.sh
	touch $@

simulate: install
	$(VENV)/bin/fedlora simulate $(ARGS)

# the whole suite (the gpu tests skip, with their reason, without CUDA), but the load tests
test: install
	$(VENV)/bin/python -m pytest -m "not load" $(PYTEST_ARGS)

# a federation under load: 16 hosts in network namespaces, a 579 MB reply (root; ~10 minutes)
test-load: install
	$(VENV)/bin/python -m pytest -m load $(PYTEST_ARGS)

# for iteration: without the tests marked slow (real Flower processes, many rounds)
test-fast: install
	$(VENV)/bin/python -m pytest -m "not slow and not load" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# docs/results.md: does federation help? (SmolLM2-135M on 2 CPU cores: about 80 minutes;
# ARGS="--split bigbench --output-dir results/federation-helps-bigbench": one real BIG-bench
# task per client, about as long again)
results: install
	$(VENV)/bin/python -m simulations.experiments.federation_helps --rounds 2 --local-steps 6 \
		--seeds 0,1 --test-per-client 10 --dataset-size 400 --output-dir results/federation-helps $(ARGS)

clean:
	rm -rf $(VENV) fedlora-output .pytest_cache
