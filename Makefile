# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Both install what they need into .venv first (torch pinned through constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
DEMO_DIR ?= runs/demo

.PHONY: setup test test-fast demo lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	# torch first, from the constraints: anything else would pull a different build.
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e ".[dicom,demo,dev]"
	rm -f $(VENV)/.installed-*; touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest tests -q

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow"

demo: setup
	$(PY) tools/demo.py --out $(DEMO_DIR)

lint: setup
	$(PY) -m ruff check mlip_dist tools tests

clean:
	rm -rf $(VENV) .pytest_cache
