# avrec: the two README commands.
#   make demo   set up (once) and run the main job on the embedded default dataset
#   make test   set up (once) and run the whole test suite
# The virtual environment lives outside the clone (default ~/.cache/avrec/venv) so clean
# clones and CI reuse it; it is (re)installed only when pyproject.toml changes.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= $(HOME)/.cache/avrec/venv
PY := $(VENV)/bin/python
DEPS_HASH := $(shell sha1sum pyproject.toml | cut -c1-12)
STAMP := $(VENV)/.avrec-deps-$(DEPS_HASH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test lint setup bench clean-data

setup: $(STAMP)
	@# Point the editable install at this clone (cheap; several clones share one venv).
	@$(PY) -I -c "import avrec.server as s, sys; sys.exit(not s.__file__.startswith('$(CURDIR)/'))" 2>/dev/null \
	  || $(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=lenient 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -I -c "import avrec.server as s, sys; assert s.__file__.startswith('$(CURDIR)/'), s.__file__"
	@$(PY) -c "from avrec.server.stubs import ensure_stubs; ensure_stubs()"

# The stamp's name carries the hash of pyproject.toml, so a fresh clone (new file times)
# reuses an environment whose dependencies are the same.
$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -m pip install -q -e '.[all]' --config-settings editable_mode=lenient 2>&1 | grep -v '^WARNING: Location' || true
	@# The browser tests (tests/web/test_browser.py) drive Debian's chromium; they skip without it.
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null) \
	  || echo "chromium not installed: the browser tests will skip"
	$(PY) -c "import feast, torch, torchvision, onnxruntime, avrec" && touch $@

demo: setup
	$(VENV)/bin/avrec demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/training_set_bench.py

clean-data:
	rm -rf data/
