# make demo   set up .venv and run the demo
# make test   set up .venv and run the test suite
# make ablation TASK=classification|segmentation|all   the paper's ablation table (bench/quality/ablation.py)
# make gpu-rehearsal   a GPU window's three calls, here, as the GPU machine runs them (bench/gpu/GPU.md)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean gpu-rehearsal ablation

# the demo needs the runtime and matplotlib; the tests also need their tools
$(VENV)/.setup-demo: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh plot
	touch $@

$(VENV)/.setup-dev: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh dev
	touch $@ $(VENV)/.setup-demo

setup: $(VENV)/.setup-dev

demo: $(VENV)/.setup-demo
	bash scripts/demo.sh

# two workers (pytest-xdist), one core each (tests/conftest.py): CI's machine has two cores; with
# one thread a worker the suite took half the time of one process on two threads (bench/RESULTS.md)
TEST_WORKERS ?= 2
test: $(VENV)/.setup-dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: $(VENV)/.setup-dev
	$(VENV)/bin/ruff check .

ablation: $(VENV)/.setup-demo
	$(PY) bench/quality/ablation.py --task $(or $(TASK),all)

gpu-rehearsal:
	python3 bench/gpu/rehearse.py

clean:
	rm -rf $(VENV) .pytest_cache
