# Set-up and checks. `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# A CPU wheel of torch; override, e.g. `make test TORCH_SPEC=torch`, for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint protos protos-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

protos: $(STAMP)
	$(BIN)/python -m protos.generate

protos-check: $(STAMP)
	$(BIN)/python -m protos.generate --check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
