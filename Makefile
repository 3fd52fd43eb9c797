# Two commands from nothing:  make test   /   make demo
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The pin (this project's machines serve it as a CPU wheel; PyPI's Linux default is the
# CUDA build: README, first section); an unpinned torch would pull a newer multi-GB CUDA build.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install test test-quick mutation seeded-bugs demo bench pretrained clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# One pytest-xdist worker per core (-n auto); plain `pytest tests` runs the same tests serially.
test: $(STAMP)
	$(BIN)/python -m pytest -n auto tests

# The quick subset: everything not marked slow (markers in pyproject.toml).
test-quick: $(STAMP)
	$(BIN)/python -m pytest -n auto tests -m "not slow"

# Mutation testing of the core (config: [tool.mutmut] in pyproject.toml); not part of
# make test: ~10k mutants, hours on a small CPU. Works in mutants/; report: docs/mutation.md.
mutation: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/mutmut run
	$(BIN)/mutmut results

# Each bug class of issue 17 put back by hand in a scratch copy; its tests must fail (minutes).
seeded-bugs: $(STAMP)
	$(BIN)/python tools/seeded_bugs.py

demo: $(STAMP)
	$(BIN)/python -m l2o.demo

bench: $(STAMP)
	$(BIN)/python bench/step_overhead.py
	$(BIN)/python bench/fast_step.py
	$(BIN)/python bench/graph_build.py
	$(BIN)/python bench/meta_train_throughput.py

# Reproduce the shipped l2o/pretrained/ weights (seconds: they are the recipe's outer step 0).
pretrained: $(STAMP)
	for k in gmn mlp; do \
	  rm -rf runs/pretrained_$$k && \
	  $(BIN)/python meta_train.py --config configs/pretrained_$$k.yaml --out runs/pretrained_$$k && \
	  cp runs/pretrained_$$k/lopt.safetensors l2o/pretrained/$$k.safetensors && \
	  cp runs/pretrained_$$k/summary.json l2o/pretrained/$$k.summary.json || exit 1; \
	done

clean:
	rm -rf $(VENV) build *.egg-info
