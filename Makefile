# seglib: the two commands of the README are `make demo` and `make test`.
# Everything installs into .venv on first use (CPU PyTorch by default; see README for CUDA).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of PyTorch that this project is tested with. For CUDA, e.g.:
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,notebooks,geo,dask,dev
STAMP := $(VENV)/.seglib-installed

.PHONY: install demo test test-fast test-numeric lint notebooks notebooks-refresh tensorboard clean

# The CPU's vector kernels the tests run on (docs/testing.md): native (what this CPU has), avx2 or
# default (portable), each capping ATen's kernels, oneDNN's convolutions and MKL's matmuls.
KERNELS ?= native
KERNELS_native :=
KERNELS_avx2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
KERNELS_default := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2
ifeq ($(filter $(KERNELS),native avx2 default),)
$(error KERNELS must be native, avx2 or default, got '$(KERNELS)')
endif
KERNEL_ENV := env $(KERNELS_$(KERNELS))

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# Trains a teacher on synthetic tiles for a few minutes on CPU, evaluates it beside RGB k-means
# and random-init features, writes TensorBoard logs under runs/demo/ and prints a table.
demo: install
	$(BIN)/python -m seglib.demo

# Unit and integration tests, the nbval regression check and the papermill runs of the notebooks.
test: install
	$(KERNEL_ENV) $(BIN)/python -m pytest

# The numeric checks only: nbval and the tests marked `numeric` (what .ci/run repeats under other
# kernel sets), e.g. `make test-numeric KERNELS=default`.
test-numeric: install
	$(KERNEL_ENV) $(BIN)/python -m pytest -m numeric

# tests/ and experiments/tests/, without the slow ones (no notebook runs, no nbval).
test-fast: install
	$(BIN)/python -m pytest -m "not slow" tests experiments/tests

# Every notebook with its CI parameters (PARAMS=full for the real experiments), executed copies in
# notebooks/_executed/ (figures included; not committed).
PARAMS ?= ci
notebooks: install
	@mkdir -p notebooks/_executed
	for nb in notebooks/0*.ipynb; do \
		stem=$$(basename $$nb .ipynb); \
		$(BIN)/papermill $$nb notebooks/_executed/$$stem.ipynb -f params/$$stem/$(PARAMS).yaml --cwd notebooks || exit 1; \
	done

# Re-execute the notebooks with their committed defaults and store the outputs of the regression
# cells (# NBVAL_CHECK_OUTPUT); everything else is stripped. Run before committing.
notebooks-refresh: install
	$(BIN)/python notebooks/refresh.py

lint: install
	$(BIN)/ruff check seglib tests notebooks experiments
	$(BIN)/ruff format --check seglib tests experiments

tensorboard: install
	$(BIN)/tensorboard --logdir runs

clean:
	rm -rf runs notebooks/_executed .pytest_cache
