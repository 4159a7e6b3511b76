# The two commands of the README:
#   make demo   the main job on the embedded synthetic data set (no download, no GPU needed)
#   make test   the test suite
# Both create the virtual environment in .venv first (torch + torchvision as a
# matching pair, DALI; see constraints.txt). pip's cache makes a second set-up fast.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := runs/demo

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) -m planktonio synth --out $(DEMO)/images --classes 6 --per-class 120
	$(PY) -m planktonio prepare --source $(DEMO)/images --out $(DEMO)/prepared --per-class 80,20,20
	$(PY) -m profiling loaders --data $(DEMO)/prepared --backends dali-cpu,torchvision,memory \
		--batch-size 64 --batches 15 --repeats 3 --json $(DEMO)/loaders.json

clean:
	rm -rf $(VENV) runs
