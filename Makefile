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

# The demo: a loader comparison, then the study's transfer recipe in small
# (pretrain tiny-cnn on four synthetic classes, fine-tune its new head on four
# others with the features frozen, evaluate on the held-out test split), then
# AMP against FP32, a profiler trace read back, and a report of it all.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) -m planktonio synth --out $(DEMO)/images --per-class 250 \
		--classes copepod,chaetognath,diatom_chain,appendicularian
	$(PY) -m planktonio prepare --source $(DEMO)/images --out $(DEMO)/prepared --per-class 200,25,25
	$(PY) -m profiling loaders --data $(DEMO)/prepared --backends auto \
		--batch-size 64 --batches 12 --repeats 3 --json $(DEMO)/loaders.json
	$(PY) -m planktonio synth --out $(DEMO)/pretrain-images --per-class 150 \
		--classes medusa,radiolarian,ctenophore,detritus
	$(PY) -m planktonio prepare --source $(DEMO)/pretrain-images --out $(DEMO)/pretrain --per-class 120,30,0
	$(PY) -m train fit --config train/configs/demo.yaml --data $(DEMO)/pretrain --out $(DEMO)/pretrain-run
	$(PY) -m train fit --config train/configs/demo.yaml --data $(DEMO)/prepared --out $(DEMO)/finetune-run \
		--set model.weights=$(DEMO)/pretrain-run/best.pt --set model.freeze=features \
		--set optimizer.lr=0.01 --set training.epochs=8
	$(PY) -m train evaluate --run $(DEMO)/finetune-run --split test
	$(PY) -m profiling amp --model tiny-cnn --image-size 112 --batch-size 32 --steps 5 --warmup 2 \
		--repeats 3 --data $(DEMO)/prepared --json $(DEMO)/amp.json
	$(PY) -m profiling trace --config train/configs/demo.yaml --data $(DEMO)/prepared --out $(DEMO)/trace
	$(PY) -m profiling inspect $(DEMO)/trace/trace-rank0.json.gz --json $(DEMO)/inspect.json
	$(PY) -m profiling report $(DEMO)/loaders.json $(DEMO)/amp.json $(DEMO)/inspect.json \
		--out $(DEMO)/report --title "make demo"
	@echo; echo "demo outputs in $(DEMO)/: report/report.md (tables and plots), finetune-run/ (metrics.jsonl," \
		"summary.json, confusion-test.png), trace/trace-rank0.json.gz"

clean:
	rm -rf $(VENV) runs
