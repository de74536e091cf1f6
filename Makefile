# Every target does its own set-up: a fresh clone needs only `make test` or `make demo`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch, pinned: an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install test test-fast demo demo-moe bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The main job: train the default tiny LIMoE on the built-in corpus (CPU, about 5 minutes) and evaluate it.
demo: install
	$(VENV)/bin/limoe train

# The MoE layer alone: plain top-1 vs LIMoE aux losses + BPR on two synthetic token modalities.
demo-moe: install
	$(VENV)/bin/limoe demo

bench: install
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) build *.egg-info
