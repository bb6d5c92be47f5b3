# Two commands do all the set-up on a fresh machine:
#   make simulate   # virtual environment + packages + the default local simulation
#   make test       # virtual environment + packages + the test suite
VENV    ?= .venv
PYTHON  ?= python3
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: install simulate test test-all clean

install: $(VENV)/.fedlora-installed

$(VENV)/.fedlora-installed: pyproject.toml scripts/setup-venv.sh
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/setup-venv.sh
	touch $@

simulate: install
	$(VENV)/bin/fedlora simulate $(ARGS)

test: install
	$(VENV)/bin/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) fedlora-output .pytest_cache
