# make demo / make test / make bench: each creates .venv (if missing) and installs fastnorm first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q
	$(BIN)/python -m pytest bench -q -p no:cacheprovider --benchmark-disable

demo: $(STAMP)
	$(BIN)/python -m fastnorm demo

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks

bench: $(STAMP)
	$(BIN)/python -m fastnorm bench --out bench/results/cpu.json --title "fastnorm on this machine's CPU"
