# vstain: `make book` builds the study, `make test` tests it. Both set up .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= book
# Notebooks the pipeline runs at once (its --jobs; empty: the profile's `jobs:`, 2 for quick, else 1).
# With 2, a notebook starts as soon as the stages it reads are done, two side by side get one core
# each and a notebook alone gets both; a long training that outlives its neighbour keeps its one core.
JOBS ?=
STAMP := $(VENV)/.installed
# Python writes a module's bytecode on its first import and every later process reuses it (the
# venv is installed without compiling, below). Where the environment sets PYTHONDONTWRITEBYTECODE, every
# process would compile all it imports from source: on a fresh clone, torch and the training code
# took 13.8 s to import each time instead of 5.4 s. Empty is "not set" to Python.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: setup test book study check-book clean-runs bench lab smoke-full

setup: $(STAMP)

# requirements.lock is one tested resolution; --no-deps keeps the installer from backtracking over
# careamics' torch<2.14 pin (the torch 2.14.1 CUDA build runs on CPU here and on a GPU).
# uv installs the lock: it fetches and unpacks the wheels in parallel (13 s on 2 cores from an empty
# cache, against pip's 75 s for the same 231 pins). Neither byte-compiles: Python compiles the few
# thousand modules a run imports on first use and keeps them.
UV_VERSION := 0.13.10
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install -q uv==$(UV_VERSION) 2>&1 | grep -v '^WARNING: Location' || test $${PIPESTATUS[0]} -eq 0
	@# uv reads no pip configuration: where the wheels come only from pip's (a mirror, a wheelhouse), pip installs
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -r requirements.lock || \
	  $(PY) -m pip install -q --no-deps --no-compile -r requirements.lock
	@# the project itself: a path entry, so no build backend has to be fetched
	echo "$(CURDIR)" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/vstain.pth
	touch $(STAMP)

# Headless Chromium for the browser check of the built book (Debian's package).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# MathJax 3 from the npm registry, so the book's equations render offline; without npm the
# pages fall back to MathJax's CDN (the build does not fail).
MATHJAX_VERSION := 3.2.2
MATHJAX := $(VENV)/share/mathjax-$(MATHJAX_VERSION)/es5/tex-mml-chtml.js

$(CHROMIUM):
	$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium

$(MATHJAX): | $(STAMP)
	@tmp=$$(mktemp -d); \
	if command -v npm >/dev/null && (cd $$tmp && npm pack -q mathjax@$(MATHJAX_VERSION) >/dev/null && tar xzf mathjax-$(MATHJAX_VERSION).tgz); then \
	  mkdir -p $(VENV)/share && rm -rf $(VENV)/share/mathjax-$(MATHJAX_VERSION) && mv $$tmp/package $(VENV)/share/mathjax-$(MATHJAX_VERSION); \
	else echo "MathJax $(MATHJAX_VERSION) not fetched (npm missing or offline): the book loads it from its CDN"; fi; \
	rm -rf $$tmp

# The unit tests; the quick book and the study's notebooks on it (profile quick-study) run afresh into
# .test-runs/quick, two notebooks at a time, and every page of the study's book opened in Chromium
# (tests/test_book.py); `make smoke-full`'s pipeline (tests/test_smoke_full.py: the full profile's
# method settings on tiny data); then every notebook with its quick defaults under nbval, except those
# the two pipelines already ran at these defaults (tests/conftest.py). The pipelines start in the
# background when collection ends and share the two cores with the unit tests at a lower priority
# (nice 10: the unit tests are one process, the pipelines several), one CPU thread per
# process (tests/conftest.py says why; an exported OMP_NUM_THREADS wins). One pytest run: its summary
# line and exit status are make's; it ends with its 25 slowest tests (where the time goes).
test: $(STAMP) $(CHROMIUM) $(MATHJAX)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=$${MKL_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=$${OPENBLAS_NUM_THREADS:-1} \
	  $(PY) -m pytest -q tests notebooks --nbval-lax --durations=25

# Run the notebooks of PROFILE (quick, book, full) with papermill, skipping the unchanged ones, and
# build the HTML into book/_build/html.
book: $(STAMP) $(MATHJAX)
	$(PY) -m vstain.book.pipeline --profile $(PROFILE) --output book $(if $(JOBS),--jobs $(JOBS))

# The study's longer experiments (profiles/study.yaml extends the book profile: the seed spread, the
# adversarial-weight sweep, the ablation). Runs in runs/book, reusing every unchanged notebook of
# `make book`, and builds its own HTML into runs/book/study/_build/html.
study: $(STAMP) $(MATHJAX)
	$(PY) -m vstain.book.pipeline --profile study $(if $(JOBS),--jobs $(JOBS))

# The full profile's method settings (widths 64, RMSprop 5e-5, a WGAN-GP from scratch, bf16-mixed,
# ResNet-18) on a tiny simulated registry, two steps per stage: profiles/smoke-full.yaml lays only
# scale keys over full.yaml. Starts from an empty runs/smoke-full so every stage trains. `make test`
# runs the same through tests/test_smoke_full.py.
smoke-full: $(STAMP)
	rm -rf runs/smoke-full
	$(PY) -m vstain.book.pipeline --profile smoke-full

# Open every page of book/_build/html in headless Chromium; screenshots in book/_build/screenshots.
check-book: $(STAMP) $(CHROMIUM)
	$(PY) -m vstain.book.browser book/_build/html

# Timing scripts (never part of make test); run them on a quiet machine.
bench: $(STAMP)
	$(PY) benchmarks/bench_unet.py --infer-width 16
	$(PY) benchmarks/bench_wgan.py --optimizer adam --critic-channels-last

# JupyterLab from the project's environment, opened on the notebooks (their defaults are the quick
# profile: run them in order, 01 -> 09). LAB_ARGS passes options, e.g. LAB_ARGS="--no-browser --port 8899".
# As root (a container), Jupyter needs --allow-root.
LAB_ARGS ?=
LAB_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
lab: $(STAMP)
	$(PY) -m jupyter lab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks $(LAB_ROOT) $(LAB_ARGS)
