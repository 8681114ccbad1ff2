# otter-gguf: `make demo` and `make test` are all a newcomer needs; both set up first.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
# torch is pinned: an unpinned torch pulls several GB of CUDA wheels
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup runtime demo test test-unit test-fast test-portable test-gpu test-vulkan parity-cuda test-quality llama-src series-check clean help

help:
	@echo "make demo       run the demo (sets up first)"
	@echo "make test       run the test suite, all tiers but vulkan (sets up first)"
	@echo "make test-unit  the unit tier only (no runtime build needed)"
	@echo "make test-fast  all but the slow tier"
	@echo "make test-portable  the suite on the portable (x86-64-v3, no AVX-512) runtime build:"
	@echo "                 run it on an AVX-512 machine before changing a numerical baseline"
	@echo "make test-vulkan  the gpu tier: every layer on Vulkan (Mesa's llvmpipe), on a cached"
	@echo "                 --backend cpu,vulkan build (needs libvulkan-dev glslc spirv-headers mesa-vulkan-drivers)"
	@echo "make test-gpu BACKEND=cuda|metal  the same tier on that GPU backend's build"
	@echo "make parity-cuda  on a CUDA machine: the gpu tier and Otter/base decode speed, all layers offloaded"
	@echo "make setup      create $(VENV) with torch, otter-gguf and the patched runtime"
	@echo "make runtime    (re)build the patched llama.cpp runtime (cached)"
	@echo "make test-quality  retrain a head and a reward model per quality task on SmolLM2, check they reproduce the committed tables (~27 min; OTTER_TEST_QUALITY_FULL=1: every row)"
	@echo "make llama-src  lay out build/llama-src: pinned llama.cpp + patches/ as git commits"
	@echo "make series-check  build every prefix of patches/ (+ the marker) and run its runtime tests:"
	@echo "                 run it before committing a change of the series"

$(VENV)/.stamp-python: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip
	$(PIP) install -q --disable-pip-version-check "$(TORCH)"
	$(PIP) install -q --disable-pip-version-check -e ".[test]"
	touch $@

setup: $(VENV)/.stamp-python
	$(VENV)/bin/otter-gguf build-runtime

runtime: $(VENV)/.stamp-python
	$(VENV)/bin/otter-gguf build-runtime

demo: setup
	$(PY) -m otter_gguf.demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# tiers (pyproject.toml markers): unit, runtime, slow
test-unit: $(VENV)/.stamp-python
	$(PY) -m pytest -q -m unit $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# the suite as an AVX2-only CPU sees it: the portable wheel's libraries, loaded through
# LLAMA_CPP_LIB_PATH (the installed native runtime stays as it is); CONTRIBUTING.md
PORTABLE := build/portable
test-portable: setup
	rm -rf $(PORTABLE)
	$(VENV)/bin/otter-gguf build-runtime --portable --no-install --wheel-out $(PORTABLE)/wheel
	$(PY) -m zipfile -e $(PORTABLE)/wheel/llama_cpp_python-*.whl $(PORTABLE)/site
	OTTER_TEST_PORTABLE=1 LLAMA_CPP_LIB_PATH=$(abspath $(PORTABLE))/site/llama_cpp/lib $(PY) -m pytest -q $(PYTEST_ARGS)

# the gpu tier on a --backend cpu,$(BACKEND) build's libraries (the installed runtime stays as it is);
# test-vulkan: on Mesa's llvmpipe with llama.cpp's own CI settings (.github/workflows/build-vulkan.yml,
# ubuntu-llvmpipe); parity-cuda: the gpu tier and the Otter/base decode speed on a CUDA machine
BACKEND ?= vulkan
GPU_ENV ?=
GPUDIR = build/gpu-$(BACKEND)
test-gpu: setup
	rm -rf $(GPUDIR)/site
	$(VENV)/bin/otter-gguf build-runtime --backend cpu,$(BACKEND) --no-install --wheel-out $(GPUDIR)/wheel
	$(PY) -m zipfile -e $(GPUDIR)/wheel/llama_cpp_python-*.whl $(GPUDIR)/site
	OTTER_TEST_GPU=$(BACKEND) $(GPU_ENV) LLAMA_CPP_LIB_PATH=$(abspath $(GPUDIR))/site/llama_cpp/lib \
	  $(PY) -m pytest -q -m gpu -s -p no:cacheprovider $(PYTEST_ARGS)

test-vulkan:
	$(MAKE) test-gpu BACKEND=vulkan GPU_ENV="GGML_VK_VISIBLE_DEVICES=0 GGML_VK_DISABLE_F16=1 GGML_VK_DISABLE_COOPMAT=1"

parity-cuda:
	$(MAKE) test-gpu BACKEND=cuda

# the quality tables (docs/EVAL.md "Otter heads against reward models") retrained and compared with
# benchmarks/results/quality-smollm2*.json
test-quality: setup
	OTTER_TEST_QUALITY=1 $(PY) -m pytest -q -m quality $(PYTEST_ARGS)
	LLAMA_CPP_LIB_PATH=$(abspath build/gpu-cuda)/site/llama_cpp/lib $(PY) benchmarks/bench_backends.py \
	  -ngl all --json benchmarks/results/backends-cuda.json

llama-src: $(VENV)/.stamp-python
	$(VENV)/bin/otter-gguf build-runtime --dev-source build/llama-src

series-check: setup
	$(PY) .ci/check-series $(SERIES_ARGS)

clean:
	rm -rf build .pytest_cache
