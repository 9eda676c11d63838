# physis - the two commands: `make demo` (set up + run the workflow on the embedded phantom,
# ending with results/report.html) and `make test` (set up + the test suite; .ci/run calls it).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all
# Train jobs declare gpu=1. With a GPU, one training at a time (TensorFlow takes the memory of every GPU it
# sees, and nothing pins a local job to its own GPU); without one, the cores decide (one core per demo job).
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
SNAKEMAKE := $(BIN)/snakemake --cores $(CORES) --rerun-incomplete $(if $(filter-out 0,$(GPUS)),--resources gpu=1)

.PHONY: setup demo test test-fast bench lint clean cluster-up cluster-down

# The virtual environment is rebuilt when the pins change.
$(BIN)/physis: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# GPU nodes: `make setup GPU=1` also installs the `gpu` extra, tensorflow[and-cuda] at the pinned version
# (TensorFlow's CUDA and cuDNN libraries as pip wheels, several GB). Without it TensorFlow sees no GPU.
$(VENV)/.gpu: $(BIN)/physis
	$(BIN)/pip install --quiet -e '.[test,gpu]'
	touch $@

setup: $(BIN)/physis $(if $(filter 1,$(GPU)),$(VENV)/.gpu)

demo: setup
	$(SNAKEMAKE) all
	$(SNAKEMAKE) all --report results/report.html

# Two workers (the CI machine's cores); the tests that share the machine's SLURM run on one of them.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25

# Unit tests only (no end-to-end workflow runs): the quick loop while developing.
test-fast: setup
	$(BIN)/pytest -q -m "not slow and not cluster and not browser"

bench: setup
	$(BIN)/python -m physis.bench --out results/bench

lint: setup
	$(BIN)/snakemake --lint

# A one-node SLURM with a fake GPU on this machine (root, Debian), to try --profile slurm-gpu by hand.
cluster-up:
	tests/cluster/setup.sh

cluster-down:
	tests/cluster/teardown.sh

clean:
	rm -rf results/* resources/phantom .snakemake
	touch results/.gitkeep
