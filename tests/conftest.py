"""Shared fixtures: tiny notebooks and a tiny book written into tmp_path."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


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


# Stems of the notebooks that tests/test_book.py's quick book executed in this session, from an
# empty run directory, at the quick profile (the notebooks' own defaults, see
# test_pipeline.test_quick_profile_is_the_notebook_defaults): the nbval pass skips their cells
# instead of training the same chain a second time. Filled only when the whole chain ran.
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


def pytest_collection_modifyitems(session, config, items):
    """When the notebooks run under nbval, start them from an empty ``runs/quick``: otherwise
    04/05 would resume a finished checkpoint and train zero steps, and nbval would not test
    training at all."""
    if any(str(item.fspath).endswith(".ipynb") for item in items):
        shutil.rmtree(ROOT / "runs" / "quick", ignore_errors=True)
