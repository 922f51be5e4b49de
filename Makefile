# vstain: `make book` builds the study, `make test` tests it. Both set up .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= book
STAMP := $(VENV)/.installed

.PHONY: setup test book check-book clean-runs bench

setup: $(STAMP)

# requirements.lock is one tested resolution; --no-deps keeps pip from backtracking over
# careamics' torch<2.14 pin (the torch 2.14.1 CUDA build runs on CPU here and on a GPU).
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install -q --no-deps -r requirements.lock 2>&1 | grep -v '^WARNING: Location' || test $${PIPESTATUS[0]} -eq 0
	@# the project itself: a path entry, so no build backend has to be fetched
	echo "$(CURDIR)" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/vstain.pth
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

book: $(STAMP)
	$(PY) -m vstain.pipeline --profile $(PROFILE)

check-book: $(STAMP)
	$(PY) -m vstain.browser book/_build/html

bench: $(STAMP)
	$(PY) benchmarks/bench_unet.py
