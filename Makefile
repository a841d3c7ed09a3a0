# make demo : train the default small CLIP on the embedded `shapes` set (CPU, ~8 min), print its zero-shot top-1
# make test : the whole test suite (unit, integration, system)
# make bench: training step vs OpenCLIP + MFU, memory, scaling, data loading vs open_clip_train's pipeline,
#             zero-shot evaluation vs CLIP_benchmark, the text classifier (bench/RESULTS.md; hours on 2 CPU cores); QUICK=1: smoke run, minutes
# Each first runs the set-up (`make setup`): the Debian packages the suite uses (as root),
# .venv with requirements.txt, and WordNet for NLTK. Only what is missing is redone.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
WORDNET = $(VENV)/.wordnet

.PHONY: setup system demo test test-fast bench clean

setup: $(STAMP) $(WORDNET)

# Debian packages (WordNet, Slurm + munge, g++): checked at every make (a quick look for the
# files), installed with apt-get only when missing, e.g. on a new machine with an old .venv
system:
	@bash tools/setup_system.sh

$(STAMP): requirements.txt | system
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# NLTK's WordNet (--text-augment, --text-reduction syntax): the stamp is written only when it
# works, so a failed attempt is tried again by the next make
$(WORDNET): $(STAMP) tools/setup_wordnet.py | system
	$(PY) tools/setup_wordnet.py && touch $(WORDNET) || \
	  echo "warning: no WordNet: --text-augment refuses to start and the tests that need it skip (see tools/setup_wordnet.py)"

demo: setup
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) main.py

test: setup
	WANDB_MODE=offline $(PY) -m pytest -q

test-fast: setup
	WANDB_MODE=offline $(PY) -m pytest -q -m "not slow"

BENCH_FLAGS = $(if $(QUICK),--quick,)
bench: $(STAMP)
	$(PY) -u bench/train_step.py $(BENCH_FLAGS)
	$(PY) -u bench/memory.py $(BENCH_FLAGS)
	$(PY) -u bench/scaling.py $(BENCH_FLAGS)
	$(PY) -u bench/openclip_pipeline.py $(BENCH_FLAGS)
	$(PY) -u bench/eval_vs_clip_benchmark.py $(BENCH_FLAGS)
	$(PY) -u bench/text_classifier.py $(BENCH_FLAGS)

clean:
	rm -rf output .pytest_cache
