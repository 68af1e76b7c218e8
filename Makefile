# make bench: check every op against its reference here, then print the speed table.
# make test:  lint, the nvcc compile check of the CUDA kernels, then the whole test suite.
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

.PHONY: test bench build lint cuda-check clean

test: lint cuda-check build
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

clean:
	rm -rf build dllm_kernels/_C*.so *.egg-info
