"""Shared fixtures: tiny notebooks and a tiny book written into tmp_path."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# One CPU thread per process, in this process and in every one the tests start (kernels, the
# background pipelines, subprocesses): the unit tests and two pipelines share the cores, and libraries
# that spread over all cores by default (torch's OpenMP, numpy's OpenBLAS) spin in their threads
# while the other processes need the cycles. Measured on 2 cores, the whole run in place: 494 s of
# pytest and 937 CPU-s with each library's default, 454 s and 864 CPU-s with one thread. A library
# reads it once, when it loads: `make test` sets it before pytest starts (a pytest plugin may load
# numpy before this file runs); here it covers a bare `pytest`, and an exported value wins.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import nbformat  # noqa: E402
import pytest  # noqa: E402

from vstain.book import rundir  # noqa: E402
from vstain.book.forkserver import keep_priority  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The tests' own runs/: notebooks, nbval and the background pipelines resolve "runs/<name>" here
# (vstain.book.rundir.RUNS_ENV), so a test run never touches a user's runs/quick or runs/book.
TEST_RUNS = ROOT / ".test-runs"
os.environ[rundir.RUNS_ENV] = str(TEST_RUNS)


def write_notebook(path: Path, parameters: str, *cells: str | tuple[str, list[str]]) -> Path:
    """A notebook with a ``parameters`` cell and code cells (``(source, tags)`` for tagged ones)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    nb.cells.append(nbformat.v4.new_markdown_cell(f"# {path.stem}"))
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells.append(params)
    for cell in cells:
        source, tags = (cell, []) if isinstance(cell, str) else cell
        c = nbformat.v4.new_code_cell(source)
        if tags:
            c.metadata["tags"] = tags
        nb.cells.append(c)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


# A stage that counts its runs, may fail on request and writes a manifest.json (without importing
# torch & co. through rundir.finish, so a test kernel starts and ends in a second or two).
STAGE_BODY = """\
import json, pathlib, time
out = pathlib.Path(run_dir) / "{stem}"
out.mkdir(parents=True, exist_ok=True)
with open(out / "runs.txt", "a") as f:
    f.write("ran\\n")
assert not fail, "{stem} was asked to fail"
(out / "manifest.json").write_text(json.dumps({{"stage": "{stem}", "value": value, "t": time.time()}}))
"""


@pytest.fixture
def tiny_book(tmp_path):
    """A project root with three stages (01_a, 02_b, 03_c), a toc and an empty profile ``p``.

    Returns a dict with ``root``, ``run_dir`` (absolute), ``toc``, ``profile`` (the file) and
    ``runs(stem)`` (how many times a stage ran)."""
    root = tmp_path / "proj"
    stems = ["01_a", "02_b", "03_c"]
    for stem in stems:
        write_notebook(root / "notebooks" / f"{stem}.ipynb",
                       'run_dir = "runs/quick"  # run directory\nvalue = 1  # a knob\nfail = False  # raise on purpose',
                       STAGE_BODY.format(stem=stem))
    (root / "book").mkdir()
    (root / "book" / "intro.md").write_text("# Tiny\n")
    toc = root / "_toc.yml"
    chapters = "".join(f"  - file: notebooks/{s}\n" for s in stems)
    toc.write_text(f"format: jb-book\nroot: book/intro\nchapters:\n{chapters}")
    shutil.copyfile(ROOT / "_config.yml", root / "_config.yml")
    (root / "profiles").mkdir()
    profile = root / "profiles" / "p.yaml"
    profile.write_text("all: {}  # defaults\n")
    run_dir = tmp_path / "runs" / "p"

    def runs(stem: str) -> int:
        f = run_dir / stem / "runs.txt"
        return len(f.read_text().splitlines()) if f.exists() else 0

    return {"root": root, "run_dir": run_dir, "toc": toc, "profile": profile, "runs": runs, "stems": stems}


def read_json(path: Path):
    return json.loads(Path(path).read_text())


# Stems of the notebooks that tests/test_book.py's quick book and quick study executed in this
# session, from an empty run directory, at the notebooks' own defaults (see
# test_pipeline.test_quick_profile_is_the_notebook_defaults): the nbval pass skips their cells
# instead of running the same chain a second time. Filled only when the whole chain ran.
QUICK_BOOK_EXECUTED: set[str] = set()


class _SkipNotebooksTheQuickBookRan:
    """Skips an nbval cell of a notebook in :data:`QUICK_BOOK_EXECUTED`, before nbval starts its kernel."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        path = Path(str(item.fspath))
        if path.suffix == ".ipynb" and path.stem in QUICK_BOOK_EXECUTED:
            pytest.skip(f"{path.name} ran at its defaults in this session's quick book (tests/test_book.py)")


def pytest_configure(config):
    # registered as a plugin: a conftest's own runtest hooks reach only the items of its folder
    config.pluginmanager.register(_SkipNotebooksTheQuickBookRan(), "vstain-skip-notebooks-the-quick-book-ran")


# The background runs' scheduling priority (nice). The unit tests are one process, the pipelines
# several (two notebooks at a time, two pipelines): at equal priority the unit tests got about a
# third of the CPU and ran alone on one core, the other idle, for ~1.5 min after the pipelines ended.
# Behind the unit tests, the pipelines take what the unit tests leave and both cores at the end.
BACKGROUND_NICE = 10


class Background:
    """A command running in the background in its own process group (stopping it stops the builds
    and the warm kernel processes it started, and their kernels with them), at
    :data:`BACKGROUND_NICE`, its output going to a log file (a pipe nobody reads would fill and stall it)."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict | None = None):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vstain-test-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(["nice", "-n", str(BACKGROUND_NICE), *cmd], cwd=cwd, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        keep_priority(self.proc.pid, BACKGROUND_NICE)  # and its session: where Linux shares the CPU by session

    def wait(self, timeout: float) -> tuple[int | None, str]:
        """Wait for the command: its exit status (None when it ran past ``timeout`` seconds and was
        stopped) and its output."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        output = Path(self.log.name).read_text()
        self.stop()
        return rc, output + ("" if rc is not None else f"\n[stopped after {timeout} s]")

    def stop(self) -> None:
        """Stop the command and everything it started (also what a finished run left behind), and
        delete the log."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group has ended
            pass
        self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def pipeline_in_background(profile: str, first: str | None = None) -> Background:
    """``python -m vstain.book.pipeline --profile <profile>`` (as many notebooks at once as the
    profile's ``jobs``) from an empty
    ``.test-runs/<profile>`` (so 04/05 train rather than resume a finished checkpoint and 03 trains
    its Noise2Void models), its HTML included. ``first``: a profile that extends it, run before it in
    the same run directory, so that the notebooks of both are scheduled together (``profile``'s run
    then finds every notebook done and builds its own HTML). Every process it starts inherits the
    session's CPU threads (one, see the top of this file)."""
    shutil.rmtree(TEST_RUNS / profile, ignore_errors=True)
    commands = [[sys.executable, "-m", "vstain.book.pipeline", "--profile", p] for p in (first, profile) if p]
    return Background(["sh", "-c", " && ".join(shlex.join(c) for c in commands)], ROOT)


# Slow runs started as soon as collection ends, so that they share the two cores with the unit
# tests instead of running after them: test name -> Background. A test declares its run with
# @in_background(start), is moved after the other tests (but before the notebooks), takes its run
# with take_background and waits for it; a run no test took is stopped when the session ends.
BACKGROUND: dict[str, Background] = {}


def in_background(start):
    """Declare that a test's slow run is ``start()`` (a :class:`Background`), started when collection ends."""
    def mark(test):
        test.background = start
        return test
    return mark


def take_background(request) -> Background:
    """The run started at collection for the test of ``request`` (pytest's fixture), or a new one."""
    return BACKGROUND.pop(request.node.name, None) or request.function.background()


def _background(item):
    return getattr(getattr(item, "function", None), "background", None)


def pytest_collection_modifyitems(session, config, items):
    """Tests that wait for a background run go after the other tests, notebooks last (they run on
    the quick book's run directory); a stable sort keeps every other order."""
    items.sort(key=lambda item: (str(item.fspath).endswith(".ipynb"), _background(item) is not None))


def pytest_collection_finish(session):
    """Once the items are chosen (after -k/-m): when notebooks run under nbval, start them from an
    empty ``.test-runs/quick`` (otherwise 04/05 would resume a finished checkpoint and train zero steps,
    and nbval would not test training at all); then start the background runs."""
    if session.config.option.collectonly:
        return
    if any(str(item.fspath).endswith(".ipynb") for item in session.items):
        shutil.rmtree(TEST_RUNS / "quick", ignore_errors=True)
    for item in session.items:
        if _background(item) is not None and item.name not in BACKGROUND:
            BACKGROUND[item.name] = _background(item)()


def pytest_sessionfinish(session):
    for run in BACKGROUND.values():
        run.stop()
