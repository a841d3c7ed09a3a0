# make demo : train the default small CLIP on the embedded `shapes` set (CPU, ~5 min), print its zero-shot top-1
# make test : the whole test suite (unit, integration, system)
# make bench: training step vs OpenCLIP + MFU, memory, scaling (bench/RESULTS.md; hours on 2 CPU cores); QUICK=1: smoke run, minutes
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) tools/setup_wordnet.py || echo "warning: no WordNet; --text-augment will refuse to start (see tools/setup_wordnet.py)"
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) main.py

test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q

test-fast: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m "not slow"

BENCH_FLAGS = $(if $(QUICK),--quick,)
bench: $(STAMP)
	$(PY) -u bench/train_step.py $(BENCH_FLAGS)
	$(PY) -u bench/memory.py $(BENCH_FLAGS)
	$(PY) -u bench/scaling.py $(BENCH_FLAGS)

clean:
	rm -rf output .pytest_cache
