"""The staged book and its HTML: the profile's executed notebooks beside copies of the narrative,
config and toc (``runs/<profile>/book_src/``), their code collapsed behind toggles, MathJax staged
for offline equations when ``make`` has fetched it, and ``jupyter-book build`` with warnings as
errors (:func:`build_html`).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import nbformat
import yaml

# MathJax 3 for offline equations: `make book` unpacks the npm package into .venv/share/; without
# it the pages load MathJax from its CDN (Sphinx's default) and show raw LaTeX when offline.
MATHJAX = Path("share") / "mathjax-3.2.2" / "es5"
_MATHJAX_PARTS = ("tex-mml-chtml.js", "input", "output/chtml", "a11y", "ui", "adaptors")


class BuildFailed(RuntimeError):
    """jupyter-book reported an error or a warning."""


def _toc_files(node: Any) -> list[str]:
    """Every ``file:`` / ``root:`` entry of a jupyter-book toc, in reading order."""
    out: list[str] = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if isinstance(node.get(key), str):
                out.append(node[key])
        for value in node.values():
            if isinstance(value, (list, dict)):
                out += _toc_files(value)
    elif isinstance(node, list):
        for item in node:
            out += _toc_files(item)
    return out


def toc_entries(toc: Path) -> list[str]:
    return _toc_files(yaml.safe_load(toc.read_text()))


def timings_table(results: Sequence) -> str:
    """A Markdown table of the notebooks' wall times, for the intro page."""
    rows = ["| notebook | wall time | this build |", "|---|---|---|"]
    for r in results:
        t = "" if r.last_success_s is None else f"{r.last_success_s / 60:.1f} min"
        rows.append(f"| {r.stem} | {t} | {'ran' if r.status == 'ran' else 'reused an earlier run'} |")
    total = sum(r.last_success_s or 0 for r in results)
    rows.append(f"| **total** | **{total / 60:.1f} min** | |")
    return "\n".join(rows)


# Cells whose code the book shows as it is: the parameters (the stored one and papermill's), a
# deliberate bad-input demo (its code is the point), and cells that already say how to show them.
SHOWN_TAGS = {"parameters", "injected-parameters", "raises-exception"}
HIDE_TAGS = {"hide-input", "remove-input", "hide-cell", "remove-cell"}


def collapse_code(nb):
    """Tag ``hide-input`` every code cell that only loads data or draws, so the built book reads as
    results first, each cell's code behind a toggle. The Imports cell (the first code cell), the
    parameters cells, ``raises-exception`` demos and cells that already carry a hide/remove tag keep
    their tags; the stored notebooks are untouched (JupyterLab shows all code)."""
    code = [c for c in nb.cells if c.get("cell_type") == "code"]
    for cell in code[1:]:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if not (SHOWN_TAGS | HIDE_TAGS) & set(tags):
            tags.append("hide-input")
    return nb


def stage_book_sources(root: Path, book_src: Path, toc: Path, profile: str, run_dir: str,
                       results: Sequence = ()) -> None:
    """Copy the narrative, config and toc into the profile's staged book (executed notebooks are
    written there by :func:`execute`) and collapse the code of those notebooks (:func:`collapse_code`).
    The pages get MyST substitutions ``{{ profile }}``, ``{{ run_dir }}`` and ``{{ timings }}`` (a
    table of the notebooks' wall times)."""
    for entry in toc_entries(toc):
        executed = book_src / f"{entry}.ipynb"
        if executed.exists():
            nbformat.write(collapse_code(nbformat.read(executed, as_version=4)), executed)
    book_src.mkdir(parents=True, exist_ok=True)
    if (book_src / "book").exists():
        shutil.rmtree(book_src / "book")
    shutil.copytree(root / "book", book_src / "book", ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints"))
    shutil.copyfile(toc, book_src / "_toc.yml")
    config = yaml.safe_load((root / "_config.yml").read_text()) or {}
    subs = config.setdefault("parse", {}).setdefault("myst_substitutions", {})
    subs.update(profile=profile, run_dir=run_dir, timings=timings_table(list(results)))
    # MathJax goes in through html_extra_path (copied as is into the HTML's _static/), not
    # html_static_path: jupyter-book adds a <script> for every .js file of a static folder.
    extra = book_src / "_extra"
    shutil.rmtree(extra, ignore_errors=True)
    found = [p / MATHJAX for p in (Path(sys.prefix), root / ".venv") if (p / MATHJAX / _MATHJAX_PARTS[0]).exists()]
    mathjax = found[0] if found else None
    if mathjax is not None:
        for part in _MATHJAX_PARTS:
            src, dst = mathjax / part, extra / "_static" / "mathjax" / part
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
        sphinx = config.setdefault("sphinx", {}).setdefault("config", {})
        sphinx["html_extra_path"] = ["_extra"]
        sphinx["mathjax_path"] = "mathjax/tex-mml-chtml.js"  # relative to the HTML's _static/
    (book_src / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))


def build_html(book_src: Path, output: Path, log_file: Path) -> Path:
    """``jupyter-book build`` (all pages, warnings are errors) into ``output/_build/html``.

    Raises:
        BuildFailed: the build's exit status was not 0; the message carries its warnings.
    """
    exe = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(book_src), "--path-output", str(output),
           "--all", "-W", "--keep-going"]
    env = {**os.environ, "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log_file.write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        lines = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr).splitlines()
        problems = [l for l in lines if "WARNING" in l or "ERROR" in l or "Error" in l] or lines[-20:]
        raise BuildFailed(f"jupyter-book build failed (full log: {log_file}):\n  " + "\n  ".join(problems[:40]))
    return output / "_build" / "html"
