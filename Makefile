# `make demo` and `make test` set everything up themselves on a fresh machine (Python 3.10+ only).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/cnnkit: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(BIN)/cnnkit

install: $(BIN)/cnnkit

demo: install
	$(BIN)/cnnkit train

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
