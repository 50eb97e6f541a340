# Set-up and checks. `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# A CPU wheel of torch; override, e.g. `make test TORCH_SPEC=torch`, for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Test processes (pytest-xdist): most tests wait on daemons they start, so three keep two
# cores busy (the suite took 13 min 45 s of pytest with two, 12 min with three) and CI well
# under its 15 minutes; 0 runs them in this process.
TEST_PROCESSES ?= 3
# Where `make demo` keeps its data, logs and summary.
DEMO_DIR ?= demo

.PHONY: install test demo lint protos protos-check clean compose-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --durations=15

# MNIST-1D on a local cluster: 2 servers, 4 workers, bounded staleness with the model's recipe
# for it (protos/recipes.py); prints the accuracy and writes the model to $(DEMO_DIR)/model.safetensors.
demo: $(STAMP)
	$(BIN)/ps-data prepare --dataset mnist1d --out $(DEMO_DIR)/mnist1d --shards 16 --if-missing
	$(BIN)/ps-cluster up --data-dir $(DEMO_DIR)/mnist1d --model mnist1d-cnn \
		--mode ssp --servers 2 --workers 4 \
		--work-dir $(DEMO_DIR)/run --summary-json $(DEMO_DIR)/summary.json \
		--save $(DEMO_DIR)/model.safetensors

# docker-compose.yml for real: build the image, train a short MNIST-1D job in containers
# (2 servers, 3 workers) and print its accuracy. Docker, or Podman where Docker has no
# engine (installed as docs/containers.md describes when missing). Not part of `make test`.
compose-test: $(STAMP)
	$(BIN)/pip install --quiet "podman-compose>=1.2"
	TORCH_SPEC="$(TORCH_SPEC)" $(BIN)/python -m tests.compose_run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

protos: $(STAMP)
	$(BIN)/python -m protos.generate

protos-check: $(STAMP)
	$(BIN)/python -m protos.generate --check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache $(DEMO_DIR)
