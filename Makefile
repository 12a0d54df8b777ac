# make demo / make test / make bench: each creates .venv (if missing) and installs fastnorm first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# the offline MNIST copy, when this machine has it (else torchvision downloads MNIST)
DATA_DIR ?= $(wildcard ../shared/data/mnist)
DATA_ARG := $(if $(DATA_DIR),--data-dir $(DATA_DIR))

.PHONY: install lint test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	bash tests/run_suites.sh $(BIN)/python

demo: $(STAMP)
	$(BIN)/python -m fastnorm demo $(DATA_ARG) --out results

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks

bench: $(STAMP)
	$(BIN)/python -m fastnorm bench --out bench/results/cpu.json --title "fastnorm on this machine's CPU"
