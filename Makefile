# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv, install torch==2.13.0 first, then the package with its test, demo and train extras.
# On this project's machines pip finds a CPU build of torch 2.13.0 on local disk; elsewhere plain
# PyPI serves a multi-GB CUDA build, so pass TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu
# for a CPU-only machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
TORCH_INDEX ?=

.PHONY: demo test test-fast bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e '.[test,demo,train,data,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qwen2 generate --dtype bfloat16 --max-new-tokens 512 "Write a Python function is_prime(n) that checks whether n is prime."

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not real" $(PYTEST_ARGS)

# llama-cpp-python (the llama.cpp peer) is benchmark-only: it builds from source (~7 min on 2 cores).
bench: $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/python -m pip install -q llama-cpp-python
	$(BIN)/python benchmarks/bench_inference.py
	$(BIN)/python benchmarks/bench_batching.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_quant_quality.py
	$(BIN)/python benchmarks/bench_tokenizer.py

clean:
	rm -rf $(VENV) build *.egg-info
