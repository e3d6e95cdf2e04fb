# Set-up installs the CPU wheel of torch unless a torch is already importable (bring your own CUDA/ROCm build
# first; see README). A bare `pip install torch` would pull a multi-GB CUDA build onto a CPU machine.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PIP := $(PYTHON) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: setup run test test-unit lint bench bench-kernels bench-peers clean

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

bench-kernels: setup
	$(PYTHON) benchmarks/bench_gemv.py --threads 1
	$(PYTHON) benchmarks/bench_kernels.py

# The peer engines are not dependencies of ryzen-opt: this installs them only for the comparison. llama-cpp-python
# builds from source (about 6 minutes on 2 cores); onnxruntime-genai's model builder also needs onnx-ir, and
# llama.cpp's converter imports sentencepiece.
bench-peers: setup
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP) install -q llama-cpp-python onnxruntime-genai onnx-ir sentencepiece
	$(PYTHON) benchmarks/bench_peers.py --model 134m --threads 1 2

clean:
	rm -rf ryzen_results .pytest_cache .hypothesis build *.egg-info
