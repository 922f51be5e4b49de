"""The book's pipeline: a profile of parameters -> papermill -> jupyter-book.

``python -m vstain.book.pipeline --profile book`` (what ``make book`` runs):

1. loads ``profiles/<profile>.yaml`` (laid over its ``base`` profile, if it names one) and checks
   every key against the parameters each notebook declares (:mod:`vstain.book.profiles`); a key
   that the target notebook does not declare is an error naming the profile, the notebook and the key;
2. runs the notebooks of ``_toc.yml`` with papermill in dependency order (``01_...`` to ``09_...``),
   from the project root, with ``run_dir: runs/<profile>`` injected, writing the executed notebooks
   into the profile's staged book (``runs/<profile>/book_src/``);
3. skips a notebook whose inputs did not change since its last successful run: its source, its
   resolved parameters and the manifests of the stages before it (a record per stage in
   ``runs/<profile>/pipeline/``);
4. stops at the first notebook that fails, names it and prints where its executed copy (with the
   failing cell's traceback) is;
5. writes per-notebook wall times to ``runs/<profile>/timings.csv``;
6. builds the HTML with jupyter-book 1.x (execution off: papermill ran the notebooks), failing on
   any Sphinx warning.

A profile that ``extends`` another (``study`` extends ``book``) runs in that profile's run directory,
reusing its unchanged notebooks, with its own notebooks added as one more part of the toc; its times
go to ``timings_<profile>.csv`` and its HTML to ``runs/<extended>/<profile>/_build/html``.

The staged book and its HTML build are :mod:`vstain.book.build`; the Sphinx extension that the
build loads is :mod:`vstain.book.sphinx_ext`.

The staged book keeps each profile's build apart: ``runs/<profile>/book_src/`` holds copies of the
top-level ``_config.yml``, ``_toc.yml`` and ``book/`` plus the executed notebooks, and its HTML goes to
``runs/<profile>/book_src/_build/html`` unless ``--output`` names another folder (``make book`` uses
``--output book`` so the HTML lands in ``book/_build/html``).

The profiles are :mod:`vstain.book.profiles`.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from . import rundir
from .build import BuildFailed, build_html, stage_book_sources, toc_entries
from .profiles import ProfileError, load_profile, resolve_parameters

EXIT_OK, EXIT_FAILED_NOTEBOOK, EXIT_PROFILE, EXIT_BUILD = 0, 1, 2, 3


class NotebookFailed(RuntimeError):
    """A notebook raised; ``executed`` is its executed copy with the failing cell's output."""

    def __init__(self, stage: str, executed: Path, detail: str):
        self.stage, self.executed, self.detail = stage, executed, detail
        super().__init__(f"notebook {stage} failed: {detail}\n  executed notebook: {executed}")


# --------------------------------------------------------------------------------------------
# The table of contents and the notebooks it names
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One notebook of the book: ``stem`` (``04_unet``), its source and its place in the toc."""

    stem: str
    source: Path  # the stored notebook (no outputs)
    toc_file: str  # the toc entry, e.g. "notebooks/04_unet"


def extended_toc(toc: Path, caption: str, notebooks: Sequence[str], out: Path) -> Path:
    """Write ``toc`` with one more numbered part, ``caption`` holding ``notebooks``, placed before
    the toc's last part (a profile that ``extends`` another adds its notebooks this way); returns ``out``."""
    data = yaml.safe_load(toc.read_text())
    part = {"caption": caption, "numbered": True, "chapters": [{"file": n} for n in notebooks]}
    if "parts" in data:
        data["parts"].insert(max(len(data["parts"]) - 1, 1), part)
    else:  # a toc without parts: the added notebooks follow its chapters
        data["chapters"] = [*data.get("chapters", []), *part["chapters"]]
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def stages_from_toc(toc: Path, root: Path) -> list[Stage]:
    """The notebooks the toc names, in dependency order (sorted by stem: ``01_`` before ``02_``).

    Raises:
        FileNotFoundError: a toc entry that points at no file.
    """
    stages = []
    for entry in toc_entries(toc):
        stem_path = root / entry
        if stem_path.with_suffix(".ipynb").exists():
            stages.append(Stage(Path(entry).name, stem_path.with_suffix(".ipynb"), entry))
        elif not (stem_path.with_suffix(".md").exists() or stem_path.exists()):
            raise FileNotFoundError(f"{toc}: entry '{entry}' points at no .md or .ipynb file under {root}")
    return sorted(stages, key=lambda s: s.stem)


# --------------------------------------------------------------------------------------------
# Running one notebook, and knowing when not to
# --------------------------------------------------------------------------------------------
def _sha(path: Path) -> str | None:
    return rundir.sha256(path) if path.exists() else None


def inputs_hash(stage: Stage, params: dict[str, Any], upstream_manifests: dict[str, Path]) -> str:
    """What decides a stage's result: its source, its parameters, the manifests before it."""
    key = {
        "notebook": _sha(stage.source),
        "params": params,
        "upstream": {stem: _sha(p) for stem, p in sorted(upstream_manifests.items())},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _error_cells(nb) -> list[tuple[int, str]]:
    """(index, 'Ename: value') of each cell that failed and was not tagged ``raises-exception``."""
    bad = []
    for i, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code" or "raises-exception" in cell.get("metadata", {}).get("tags", []):
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                bad.append((i, f"{out.get('ename')}: {out.get('evalue')}"))
                break
        else:
            if cell.get("metadata", {}).get("papermill", {}).get("exception"):
                bad.append((i, "cell raised (no error output)"))
    return bad


def render_carriage_returns(nb):
    """Store stream outputs as a terminal shows them: consecutive outputs of one stream merged, and
    of each line only what follows its last carriage return. Progress bars (Lightning, careamics)
    redraw one line with ``\r``; without this the book prints every redraw, hundreds of lines."""
    for cell in nb.cells:
        merged = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream" \
                    and merged[-1].get("name") == out.get("name"):
                merged[-1]["text"] += out["text"]
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream" and "\r" in out["text"]:
                lines = out["text"].split("\n")
                out["text"] = "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines)
        if "outputs" in cell:
            cell["outputs"] = merged
    return nb


def execute(stage: Stage, params: dict[str, Any], executed: Path, cwd: Path, progress: bool = False) -> None:
    """Run one notebook with papermill into ``executed``.

    Papermill's own ``execute_notebook`` raises on *any* error output, including the deliberate
    bad-input demos tagged ``raises-exception`` that nbclient lets pass; so this parameterises with
    papermill, executes with papermill's engine (saving after each cell) and judges the errors here.

    Raises:
        NotebookFailed: a cell not tagged ``raises-exception`` raised.
    """
    import papermill
    from papermill.engines import papermill_engines
    from papermill.iorw import write_ipynb
    from papermill.utils import chdir

    executed.parent.mkdir(parents=True, exist_ok=True)
    nb = papermill.execute_notebook(
        str(stage.source), str(executed), parameters=params, prepare_only=True, progress_bar=False, cwd=str(cwd)
    )
    kernel = papermill_engines.nb_kernel_name(engine_name=None, nb=nb)
    with chdir(str(cwd)):
        nb = papermill_engines.execute_notebook_with_engine(
            None, nb, kernel_name=kernel, input_path=str(stage.source), output_path=str(executed),
            progress_bar=progress, log_output=False, start_timeout=120,
        )
    write_ipynb(render_carriage_returns(nb), str(executed))
    bad = _error_cells(nb)
    if bad:
        index, what = bad[0]
        raise NotebookFailed(stage.stem, executed, f"cell {index} raised {what}")


# --------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------
@dataclass
class NotebookRun:
    stem: str
    status: str  # "ran", "skipped", "failed"
    wall_s: float  # this invocation
    last_success_s: float | None  # wall time of the run whose results the book shows


@dataclass
class Result:
    profile: str
    run_dir: Path
    book_src: Path
    html: Path | None
    stages: list[NotebookRun]


def _write_timings(path: Path, results: list[NotebookRun], build_s: float | None) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", "status", "wall_s", "last_success_s"])
        for r in results:
            w.writerow([r.stem, r.status, f"{r.wall_s:.1f}",
                        "" if r.last_success_s is None else f"{r.last_success_s:.1f}"])
        if build_s is not None:
            w.writerow(["jupyter-book", "ran", f"{build_s:.1f}", f"{build_s:.1f}"])


def run(
    profile: str,
    *,
    root: Path | None = None,
    profile_path: Path | None = None,
    toc: Path | None = None,
    run_dir: str | None = None,
    output: Path | None = None,
    only: list[str] | None = None,
    force: bool = False,
    build: bool = True,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Result:
    """Run the book for one profile (see the module docstring).

    Args:
        profile: the profile's name; its file is ``profiles/<profile>.yaml`` unless ``profile_path``.
        root: the project root (default: :func:`vstain.book.rundir.repo_root`); notebooks run from here.
        toc: the table of contents (default ``<root>/_toc.yml``); its notebooks are the stages. A
            profile that extends another adds its notebooks to it (:func:`extended_toc`).
        run_dir: injected into every notebook (default ``runs/<profile>``, or ``runs/<extended
            profile>`` for a profile that extends one, relative to ``root``).
        output: folder that receives ``_build/html`` (default: the staged book ``<run_dir>/book_src``;
            ``<run_dir>/<profile>`` for a profile that extends another).
        only: run only these stems (the others are still validated and, if executed before, kept).
        force: rerun even when nothing changed.
        build: build the HTML after the notebooks.
        progress: show papermill's per-cell progress bar.

    Raises:
        ProfileError, NotebookFailed, BuildFailed, FileNotFoundError.
    """
    root = Path(root or rundir.repo_root()).resolve()
    profile_path = Path(profile_path or root / "profiles" / f"{profile}.yaml")
    prof = load_profile(profile_path)
    toc = Path(toc or root / "_toc.yml")
    run_dir = run_dir or f"runs/{prof.extends or profile}"
    runs = rundir.resolve(run_dir, root)
    book_src = runs / "book_src"  # one staged book per run directory: only the toc's pages are read
    records = runs / "pipeline"
    suffix = f"_{profile}" if prof.extends else ""  # an extending profile keeps its own timings and HTML
    records.mkdir(parents=True, exist_ok=True)
    if prof.extends:
        toc = extended_toc(toc, prof.part or profile, prof.notebooks, records / f"toc{suffix}.yml")
        output = output or runs / profile

    stages = stages_from_toc(toc, root)
    added = {Path(n).name for n in prof.notebooks}
    params = resolve_parameters(prof, stages, run_dir)
    if only:
        unknown = set(only) - {s.stem for s in stages}
        if unknown:
            raise ProfileError(f"--only: no notebook named {', '.join(sorted(unknown))} in {toc}")
    log(f"[vstain] profile '{profile}': {len(stages)} notebooks, run_dir {run_dir}, staged book {book_src}")

    results: list[NotebookRun] = []
    timings = runs / f"timings{suffix}.csv"
    try:
        for i, stage in enumerate(stages, 1):
            executed = book_src / f"{stage.toc_file}.ipynb"
            record_path = records / f"{stage.stem}.json"
            record = json.loads(record_path.read_text()) if record_path.exists() else {}
            # an added notebook's results never feed the extended profile's notebooks
            upstream = {s.stem: runs / s.stem / rundir.MANIFEST for s in stages[: i - 1]
                        if stage.stem in added or s.stem not in added}
            digest = inputs_hash(stage, params[stage.stem], upstream)
            manifest = runs / stage.stem / rundir.MANIFEST
            head = f"[{i}/{len(stages)}] {stage.stem:<14}"
            unchanged = (
                record.get("inputs") == digest
                and record.get("manifest") == _sha(manifest)
                and manifest.exists()
                and executed.exists()
            )
            if (only and stage.stem not in only) or (unchanged and not force):
                why = "not selected" if only and stage.stem not in only else "unchanged"
                log(f"{head} skipped ({why}; last run {record.get('wall_s', float('nan')):.1f} s)")
                results.append(NotebookRun(stage.stem, "skipped", 0.0, record.get("wall_s")))
                if not executed.exists():  # never run: the book shows the stored notebook
                    executed.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(stage.source, executed)
                continue
            log(f"{head} running ...")
            record_path.unlink(missing_ok=True)
            t0 = time.time()
            try:
                execute(stage, params[stage.stem], executed, cwd=root, progress=progress)
            except NotebookFailed:
                results.append(NotebookRun(stage.stem, "failed", time.time() - t0, None))
                raise
            except Exception as exc:  # kernel died, timeout, bad parameters: same treatment
                results.append(NotebookRun(stage.stem, "failed", time.time() - t0, None))
                raise NotebookFailed(stage.stem, executed, f"{type(exc).__name__}: {exc}") from exc
            wall = time.time() - t0
            if not manifest.exists():
                results.append(NotebookRun(stage.stem, "failed", wall, None))
                raise NotebookFailed(stage.stem, executed, f"finished but wrote no {manifest} (rundir.finish)")
            record = {"inputs": digest, "manifest": _sha(manifest), "wall_s": round(wall, 2),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "params": params[stage.stem]}
            record_path.write_text(json.dumps(record, indent=2, default=str))
            results.append(NotebookRun(stage.stem, "ran", wall, wall))
            log(f"{head} ran in {wall:.1f} s")
    finally:
        _write_timings(timings, results, None)

    html = None
    if build:
        stage_book_sources(root, book_src, toc, profile, run_dir, results)
        out = Path(output).resolve() if output else book_src
        log(f"[book] jupyter-book build -> {out / '_build' / 'html'} ...")
        t0 = time.time()
        html = build_html(book_src, out, runs / f"book_build{suffix}.log")
        build_s = time.time() - t0
        _write_timings(timings, results, build_s)
        log(f"[book] built in {build_s:.1f} s: open {html / 'index.html'}")
    log(f"[vstain] timings: {timings}")
    return Result(profile, runs, book_src, html, results)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vstain.book.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="book", help="profiles/<name>.yaml (quick, book, full, smoke-full)")
    ap.add_argument("--root", type=Path, help="project root (default: this checkout)")
    ap.add_argument("--run-dir", help="run directory injected into the notebooks (default: runs/<profile>)")
    ap.add_argument("--output", type=Path, help="folder that receives _build/html (default: runs/<profile>/book_src)")
    ap.add_argument("--toc", type=Path, help="table of contents (default: _toc.yml)")
    ap.add_argument("--only", help="comma-separated notebook stems to run (others are kept as they are)")
    ap.add_argument("--force", action="store_true", help="rerun notebooks even when nothing changed")
    ap.add_argument("--no-build", action="store_true", help="run the notebooks, skip the HTML")
    args = ap.parse_args(argv)
    try:
        run(args.profile, root=args.root, run_dir=args.run_dir, toc=args.toc, output=args.output, force=args.force,
            build=not args.no_build, only=args.only.split(",") if args.only else None, progress=sys.stderr.isatty())
    except (ProfileError, FileNotFoundError) as exc:
        print(f"[vstain] ERROR: {exc}", file=sys.stderr)
        return EXIT_PROFILE
    except NotebookFailed as exc:
        print(f"[vstain] FAILED at notebook {exc.stage}: {exc.detail}\n"
              f"[vstain] the executed notebook, with the failing cell's output: {exc.executed}", file=sys.stderr)
        return EXIT_FAILED_NOTEBOOK
    except BuildFailed as exc:
        print(f"[vstain] ERROR: {exc}", file=sys.stderr)
        return EXIT_BUILD
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
