# Two entry points do all set-up on a fresh machine: `make train` and `make test`.
# The venv is built once and rebuilt when the packaging or the C++ sources change.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch; an unpinned `torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.grpo_fast-installed

.PHONY: setup test train bench bench-tiling-tv clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $@

test: setup
	$(PY) -m pytest tests

train: setup
	$(PY) -m grpo_fast.train $(ARGS)

bench: setup
	$(PY) -m pytest benchmarks/ --benchmark-only $(ARGS)

# transformers' torchvision-based InternVL image processor, as a peer of the C++ tiler: torchvision only installs
# here as torch 2.14.1 + torchvision 0.29.1 (a ~5.5 GB CUDA build), so it lives in a venv of its own and imports
# grpo_fast (and the tiler built by `setup`) from the source tree.
bench-tiling-tv: setup
	test -x .venv-tv/bin/python || $(PYTHON) -m venv .venv-tv
	.venv-tv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 transformers pillow numpy pytest pytest-benchmark
	PYTHONPATH=$(CURDIR) .venv-tv/bin/python -m pytest benchmarks/test_tiling.py --benchmark-only $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
