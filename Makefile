# Each target sets itself up: .venv is created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test docs bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-test
	$(BIN)/python -m attnax.demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q tests
	$(BIN)/python -m pytest -q -p no:cacheprovider --doctest-modules attnax

# -E: a fresh environment every time, so warnings in unchanged pages are not skipped.
# The doctest builder reuses the html build's doctrees and runs the examples of the
# narrative pages (docstring examples run under `make test`).
docs: $(VENV)/.installed-docs
	$(BIN)/python -m sphinx -E -W --keep-going -b html -d docs/_build/doctrees docs docs/_build/html
	$(BIN)/python -m sphinx -W --keep-going -b doctest -d docs/_build/doctrees docs docs/_build/doctest

bench: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks --help

lint: $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check attnax tests benchmarks

clean:
	rm -rf $(VENV) docs/_build .pytest_cache
