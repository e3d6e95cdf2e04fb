# Set-up installs the CPU wheel of torch unless a torch is already importable (bring your own CUDA/ROCm build
# first; see README). A bare `pip install torch` would pull a multi-GB CUDA build onto a CPU machine.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PIP := $(PYTHON) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: setup run test test-unit lint bench clean

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,dev]"

run: setup
	$(PYTHON) -m ryzen_opt run

test: setup
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(PYTHON) -m pytest tests/unit $(PYTEST_ARGS)

lint:
	$(PYTHON) -m ruff check ryzen_opt pytest_ryzen tests benchmarks
	$(PYTHON) -m ruff format --check ryzen_opt pytest_ryzen tests benchmarks

bench: setup
	$(PYTHON) -m ryzen_opt bench noise
	$(PYTHON) benchmarks/bench_training.py

clean:
	rm -rf ryzen_results .pytest_cache .hypothesis build *.egg-info
