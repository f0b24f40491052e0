# Every target creates the virtual environment when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch from PyPI by default: on Linux x86_64 that is the CUDA build (GPU libraries included, several GB).
# For the CPU-only wheel (no GPU libraries), on a fresh .venv (rm -rf .venv first):
#   make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" run
TORCH_SPEC ?= torch==2.13.0
# What `make run` needs, then what the tests, linters and benchmarks add (pytest, ruff, Triton for the
# kernels' interpreter tests, matplotlib...): a first `make run` does not download the second part.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed

.PHONY: run test proto lint format migrate require-database-url bench venv node-deps clean

venv: $(STAMP)

$(RUN_STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/openlora up

# Two pytest workers, each test file on one of them: most of the suite's time is processes starting and
# waiting for each other, which the second worker overlaps (tests/conftest.py gives each worker its own
# Redis database; every test module has its own PostgreSQL database already).
TEST_WORKERS ?= 2

test: $(STAMP) node-deps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The Node.js client example is tested against a live system when npm is present.
node-deps:
	@if [ -d examples/node/node_modules ]; then :; \
	elif command -v npm >/dev/null 2>&1; then npm ci --prefix examples/node --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the Node.js client test will be skipped"; fi

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=. --pyi_out=. --grpc_python_out=. \
		protos/openlora/v1/inference.proto protos/openlora/v1/admin.proto protos/openlora/v1/worker.proto

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Migrates the external database named by OPENLORA_DATABASE_URL (`make run` migrates its embedded one itself).
migrate: require-database-url $(STAMP)
	$(BIN)/openlora control-plane --migrate-only

require-database-url:
	@if [ -z "$$OPENLORA_DATABASE_URL" ]; then \
		echo "make migrate: set OPENLORA_DATABASE_URL to the PostgreSQL to migrate (make run migrates its embedded database at start)" >&2; \
		exit 2; \
	fi

# CPU benchmarks, each against its baseline in the same run; figures go to benchmarks/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.engine_bench
	$(BIN)/python -m benchmarks.profile_step
	$(BIN)/python -m benchmarks.profile_step --no-adapters
	$(BIN)/python -m benchmarks.serving_overhead
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.coldstart

clean:
	rm -rf $(VENV) .state examples/node/node_modules
