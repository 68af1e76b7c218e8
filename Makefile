# make bench: check every op against its reference here, then print the speed table.
# make test:  lint, the nvcc compile check of the CUDA kernels and their torch bindings, then the tests.
# Both create .venv with the pinned requirements and build the extension first when needed.
# On a machine whose Python already has (CUDA) torch and no internet, use that interpreter and
# install no dependencies:  make test PYTHON=python3 VENV=
PYTHON ?= python3
VENV ?= .venv
BENCH_ARGS ?=
PYTEST_ARGS ?=

ifeq ($(strip $(VENV)),)
PY := $(PYTHON)
DEPS :=
else
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps
endif

# A broken C++/CUDA build must fail here, not leave a package that quietly runs on the reference.
export DLLM_REQUIRE_EXTENSION := 1

SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
STAMP := build/.installed-$(subst /,_,$(PY))

.PHONY: test bench build lint cuda-check bindings-check clean

test: lint cuda-check build bindings-check
	$(PY) -m pytest $(PYTEST_ARGS)

bench: build
	$(PY) -m dllm_kernels.bench $(BENCH_ARGS)

build: $(STAMP)

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

# Editable install of this package only (--no-deps): the pinned torch is the one compiled against.
$(STAMP): $(DEPS) $(SOURCES)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@mkdir -p build && touch $@

# ruff comes with the pinned requirements; an interpreter given with VENV= may not have it.
lint: $(DEPS)
	@if $(PY) -m ruff --version >/dev/null 2>&1; then \
	  $(PY) -m ruff check . && $(PY) -m ruff format --check .; \
	else echo "lint: skipped (no ruff for $(PY))"; fi

# Every framework-free kernel compiles: CUDA for sm_80 and sm_90a (a register spill fails), C++ without torch.
cuda-check:
	@if command -v nvcc >/dev/null && command -v cmake >/dev/null; then \
	  cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null && \
	  cmake --build build/cmake; \
	else echo "cuda-check: skipped (nvcc or cmake not found)"; fi

# The CUDA branches of the torch bindings, which a CPU torch cannot build: syntax-checked against torch's
# and CUDA's headers (the one c10 header a CPU wheel lacks, its CMake-generated config, is stubbed).
# nvcc names its own include folder; a CUDA torch builds the real bindings, so this is for CPU torch only.
# torch's headers make each file ~20 s: the files are checked in parallel, and again only when they change.
CUDA_INCLUDE := $(shell nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/.* INCLUDES="-I\([^"]*\)".*/\1/p')
BINDINGS := $(wildcard csrc/torch/*.cpp)
BINDINGS_CHECKED := build/.bindings-checked-$(subst /,_,$(PY))
bindings-check: $(BINDINGS_CHECKED)

$(BINDINGS_CHECKED): $(STAMP) $(BINDINGS) $(shell find csrc -name '*.h')
	@if [ -f "$(CUDA_INCLUDE)/cuda_runtime_api.h" ] && $(PY) -c "import torch, sys; sys.exit(bool(torch.version.cuda))"; then \
	  mkdir -p build/stub/c10/cuda/impl && echo '#pragma once' >build/stub/c10/cuda/impl/cuda_cmake_macros.h; \
	  flags=$$($(PY) -c "import sysconfig, torch.utils.cpp_extension as e; \
	    print(' '.join('-I' + p for p in [*e.include_paths(), sysconfig.get_paths()['include']]))") && \
	  printf '%s\n' $(BINDINGS) | xargs -P "$$(nproc)" -I{} $(CXX) -std=c++20 -fsyntax-only -DDLLM_WITH_CUDA \
	    -DTORCH_EXTENSION_NAME=_C -Icsrc -Ibuild/stub $$flags -I$(CUDA_INCLUDE) {} && \
	  touch $@ && echo "bindings-check: the CUDA bindings compile"; \
	else echo "bindings-check: skipped (no CUDA headers)"; fi

clean:
	rm -rf build dllm_kernels/_C*.so *.egg-info
