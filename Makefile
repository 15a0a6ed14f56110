# `make demo` and `make test` set everything up themselves on a fresh machine (Python 3.10+ only).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install chromium clean

# constraints.txt pins the versions the tests ran with (pyproject.toml gives ranges), so nothing here installs
# a different torch.
$(BIN)/cnnkit: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(BIN)/cnnkit

install: $(BIN)/cnnkit

demo: install
	$(BIN)/cnnkit train

# The report test opens report.html in headless Chromium (Debian's package), installed here where it is missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get) for the report test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: no chromium and no root to install it: the browser test will be skipped"; fi; }

# Two test processes (pytest-xdist), each test file's tests in one of them, each process computing with one thread
# (tests/conftest.py): most tests start `cnnkit` commands, each forked from a process that has imported torch
# (tests/preloaded.py). On 2 cores the two processes took the suite from 10 min 17 s to 6 min 3 s; the forks, with
# 100 more tests, from 9 min to 5 min 30 s (docs/design.md, "The test suite"). `pytest` alone runs them in one process.
test: install chromium
	$(BIN)/python -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache
