# The two commands of the README:
#   make demo   the main job on the embedded synthetic data set (no download, no GPU needed)
#   make test   the test suite's fast tier (every test but the slow tier's)
# and the slow tier, which .ci/run runs too:
#   make test-slow   real Slurm jobs and programs that take minutes by nature (pytest -m slow)
# Both create the virtual environment in .venv first (torch + torchvision as a
# matching pair, DALI; see constraints.txt). pip's cache makes a second set-up fast.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := runs/demo

.PHONY: demo test test-slow lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The Python code with ruff (its rules: pyproject.toml, [tool.ruff]); the job scripts with Debian's
# shellcheck (following what they source).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	shellcheck -x slurm/*.sbatch slurm/common.sh slurm/submit slurm/sweep

# The demo: the study's transfer recipe in small (pretrain tiny-cnn on four
# synthetic classes, fine-tune its new head on four others with the features
# frozen, evaluate on the held-out test split), then `profiling suite` on the
# same data (the loaders compared, AMP against FP32, end-to-end training per
# loader and precision, a trace read back, the report), whose report ends it.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) -m planktonio synth --out $(DEMO)/images --per-class 250 \
		--classes copepod,chaetognath,diatom_chain,appendicularian
	$(PY) -m planktonio prepare --source $(DEMO)/images --out $(DEMO)/prepared --per-class 200,25,25
	$(PY) -m planktonio synth --out $(DEMO)/pretrain-images --per-class 150 \
		--classes medusa,radiolarian,ctenophore,detritus
	$(PY) -m planktonio prepare --source $(DEMO)/pretrain-images --out $(DEMO)/pretrain --per-class 120,30,0
	$(PY) -m train fit --config train/configs/demo.yaml --data $(DEMO)/pretrain --out $(DEMO)/pretrain-run
	$(PY) -m train fit --config train/configs/demo.yaml --data $(DEMO)/prepared --out $(DEMO)/finetune-run \
		--set model.weights=$(DEMO)/pretrain-run/best.pt --set model.freeze=features \
		--set optimizer.lr=0.01 --set training.epochs=8
	$(PY) -m train evaluate --run $(DEMO)/finetune-run --split test
	$(PY) -m profiling suite --data $(DEMO)/prepared --out $(DEMO)/suite --minutes 5
	@echo; cat $(DEMO)/suite/report/report.md
	@echo; echo "demo outputs in $(DEMO)/: suite/report/report.md (the report above, with its plots)," \
		"suite/ (each measurement's JSON, logs/, train/, trace/), finetune-run/ (metrics.jsonl," \
		"summary.json, confusion-test.png)"

clean:
	rm -rf $(VENV) runs
