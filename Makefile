# Two entry points do all set-up on a fresh machine: `make train` and `make test`.
# The venv is built once and rebuilt when the packaging or the C++ sources change.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch; an unpinned `torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.grpo_fast-installed

.PHONY: setup test train bench bench-tiling-tv asan gpu-check clean

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

# The C++ extension (tiler and row ops) under AddressSanitizer + UBSan, built in build/asan (the suite's
# grpo_fast/_tiling*.so stays as it is) and loaded by tests/conftest.py into a Python that preloads libasan (and
# libstdc++, so that ASan's interceptor catches C++ exceptions): the tiler tests, the fuzz test (test_large measures
# memory, which the sanitizers inflate) and the row-op tests. The first sanitizer report fails the run.
ASAN_DIR := $(CURDIR)/build/asan
asan: setup
	cmake -S . -B $(ASAN_DIR) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=$(CXX) \
	  -DPython_EXECUTABLE=$(abspath $(PY)) -Dpybind11_DIR="$$($(PY) -m pybind11 --cmakedir)" \
	  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$(ASAN_DIR)/lib \
	  -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer" \
	  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined"
	cmake --build $(ASAN_DIR) -j
	GRPO_FAST_TILING_SO="$$(ls $(ASAN_DIR)/lib/_tiling*.so)" \
	  LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(PY) -m pytest tests/vision tests/kernels/test_rowops_cpp.py -q -p no:cacheprovider --capture=sys \
	  --ignore=tests/vision/test_large.py $(ARGS)

# A machine with one NVIDIA GPU (TORCH must name a CUDA build of torch), about 8 minutes, no model download: the
# CUDA tests, the loss benchmark at GPU shapes beside Liger and TRL, 10 GRPO steps with --bf16, torchrun with nccl,
# and the GPU targets as PASS / FAIL; gpu-check.json and gpu-check.md land in $(OUT), else runs/gpu-check.
gpu-check: setup
	$(PY) scripts/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
