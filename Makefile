# make demo   set up .venv and run the demo
# make test   set up .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean

$(VENV)/.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh dev
	touch $@

setup: $(VENV)/.setup-done

demo: setup
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
