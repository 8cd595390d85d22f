# Streamhold: `make run` serves on http://127.0.0.1:8000 (SQLite under ./data); `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export UV_PYTHON_DOWNLOADS := never

.PHONY: all install run test torture lint bench lock system-deps clean

all: install

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install -q "uv==0.13.8"
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@touch $@

run: install
	@mkdir -p data
	$(BIN)/streamhold serve --host 127.0.0.1 --port 8000

# System packages the tests need, installed only when missing (Chromium for the browser tests, Node for
# the protocol conformance suite and the real clients).
system-deps:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ echo "installing Chromium for the browser tests"; apt-get update -qq && apt-get install -y -qq chromium; }
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || \
		{ echo "installing Node.js for the conformance suite"; apt-get update -qq && apt-get install -y -qq nodejs npm; }

test: install system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=30

# The fault and race harness at length: minutes of each configuration instead of the test run's seconds.
# STREAMHOLD_FAULT_SECONDS sets the length of each run; STREAMHOLD_FAULT_SEED=<seed> replays a failure.
torture: install
	STREAMHOLD_TORTURE=1 $(BIN)/python -m pytest -q -p no:cacheprovider --timeout=1800 tests/test_faults.py tests/test_fuzz.py

lint: install
	$(BIN)/ruff check app tests e2e benchmarks
	$(BIN)/mypy

# BENCH_ARGS: options of python -m benchmarks.run, such as --big (a million streams) or --only create.
bench: install
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev -o requirements.lock --python-version 3.11 -q

clean:
	rm -rf $(VENV) .cache
