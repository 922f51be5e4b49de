"""The book's pipeline: a profile of parameters -> papermill -> jupyter-book.

``python -m vstain.book.pipeline --profile book`` (what ``make book`` runs):

1. loads ``profiles/<profile>.yaml`` (laid over its ``base`` profile, if it names one) and checks
   every key against the parameters each notebook declares (:mod:`vstain.book.profiles`); a key
   that the target notebook does not declare is an error naming the profile, the notebook and the key;
2. runs the notebooks of ``_toc.yml`` with papermill as they become ready (the stages they read done;
   of those ready, the one heading the longest chain first, then the book's order ``01_...`` to ``10_...``),
   from the project root, with ``run_dir: runs/<profile>`` injected, writing the executed notebooks
   into the profile's staged book (``runs/<profile>/book_src/``); a notebook starts once the stages
   it reads have finished (:mod:`vstain.book.schedule`), and ``--jobs N`` runs up to N side by side;
3. skips a notebook whose inputs did not change since its last successful run: its source, its
   resolved parameters and the manifests of the stages it reads (a record per stage in
   ``runs/<profile>/pipeline/``);
4. stops at the first notebook that fails (the ones already running finish), names it and prints
   where its executed copy (with the failing cell's traceback) is;
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
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from vstain.threads import available_cores

from . import rundir, schedule
from .forkserver import WarmKernels
from .kernel import NotebookFailed, Stage, kernel_environment, submit, thread_settings, threads_for_next
from .build import BuildFailed, build_html, stage_book_sources, toc_entries
from .profiles import ProfileError, load_profile, resolve_parameters

EXIT_OK, EXIT_FAILED_NOTEBOOK, EXIT_PROFILE, EXIT_BUILD = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------
# The table of contents and the notebooks it names
# --------------------------------------------------------------------------------------------
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
    """The notebooks the toc names, in the book's order (sorted by stem: ``01_`` before ``02_``).

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
    """What decides a stage's result: its source, its parameters, the manifests of the stages it reads."""
    key = {
        "notebook": _sha(stage.source),
        "params": params,
        "upstream": {stem: _sha(p) for stem, p in sorted(upstream_manifests.items())},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


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
    jobs: int | None = None,
    warm_kernels: bool = True,
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
        progress: show papermill's per-cell progress bar (one notebook at a time only).
        jobs: notebooks run at once (default: the profile's ``jobs``), each in its own process as
            soon as the stages it reads have finished (:mod:`vstain.book.schedule`); with more than
            one, a notebook alone gets every core and notebooks side by side an equal share
            (:func:`~vstain.book.kernel.threads_for_next`), unless ``OMP_NUM_THREADS`` is set (then
            every kernel inherits it).
        warm_kernels: fork each notebook's kernel from a process that has imported the study's
            libraries (:mod:`vstain.book.forkserver`), instead of starting each from scratch.

    Raises:
        ProfileError, NotebookFailed, BuildFailed, FileNotFoundError, DependencyError.
    """
    root = Path(root or rundir.repo_root()).resolve()
    profile_path = Path(profile_path or root / "profiles" / f"{profile}.yaml")
    prof = load_profile(profile_path)
    jobs = prof.jobs if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: at least one notebook must run at a time")
    progress = progress and jobs == 1  # papermill's per-cell bars of two notebooks would interleave
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

    deps = schedule.dependencies([s.stem for s in stages], {s.stem: s.source for s in stages}, params)
    # an added notebook's results never feed the extended profile's notebooks
    deps = {stem: [d for d in ds if stem in added or d not in added] for stem, ds in deps.items()}
    index = {s.stem: i for i, s in enumerate(stages, 1)}
    chain = schedule.chain_lengths(deps)
    done: dict[str, NotebookRun] = {}
    timings = runs / f"timings{suffix}.csv"

    def head(stage: Stage) -> str:
        return f"[{index[stage.stem]}/{len(stages)}] {stage.stem:<14}"

    def plan(stage: Stage) -> str | None:
        """Skip ``stage`` (recorded in ``done``) and return None, or return its inputs' digest."""
        executed = book_src / f"{stage.toc_file}.ipynb"
        record_path = records / f"{stage.stem}.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        upstream = {d: runs / d / rundir.MANIFEST for d in deps[stage.stem]}
        digest = inputs_hash(stage, params[stage.stem], upstream)
        # a record written before the pipeline knew what each notebook reads hashed every stage before it
        earlier = {s.stem: runs / s.stem / rundir.MANIFEST for s in stages[: index[stage.stem] - 1]
                   if stage.stem in added or s.stem not in added}
        manifest = runs / stage.stem / rundir.MANIFEST
        legacy = inputs_hash(stage, params[stage.stem], earlier) if set(deps[stage.stem]) <= set(earlier) else None
        unchanged = (record.get("inputs") in (digest, legacy)
                     and record.get("manifest") == _sha(manifest) and manifest.exists() and executed.exists())
        if (only and stage.stem not in only) or (unchanged and not force):
            why = "not selected" if only and stage.stem not in only else "unchanged"
            log(f"{head(stage)} skipped ({why}; last run {record.get('wall_s', float('nan')):.1f} s)")
            done[stage.stem] = NotebookRun(stage.stem, "skipped", 0.0, record.get("wall_s"))
            if not executed.exists():  # never run: the book shows the stored notebook
                executed.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(stage.source, executed)
            return None
        return digest

    def finished(stage: Stage, digest: str, t0: float, error: str | None) -> NotebookFailed | None:
        """Record a notebook that ended; the failure, if it failed."""
        wall = time.time() - t0
        executed = book_src / f"{stage.toc_file}.ipynb"
        manifest = runs / stage.stem / rundir.MANIFEST
        if error is None and not manifest.exists():
            error = f"finished but wrote no {manifest} (rundir.finish)"
        if error is not None:
            done[stage.stem] = NotebookRun(stage.stem, "failed", wall, None)
            log(f"{head(stage)} FAILED after {wall:.1f} s: {error}")
            return NotebookFailed(stage.stem, executed, error)
        record = {"inputs": digest, "manifest": _sha(manifest), "wall_s": round(wall, 2),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "params": params[stage.stem]}
        (records / f"{stage.stem}.json").write_text(json.dumps(record, indent=2, default=str))
        done[stage.stem] = NotebookRun(stage.stem, "ran", wall, wall)
        log(f"{head(stage)} ran in {wall:.1f} s")
        return None

    cores = available_cores()
    chosen = jobs == 1 or "OMP_NUM_THREADS" in os.environ  # torch's default, or the user's threads
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) if jobs > 1 else None
    pending, running = list(stages), {}
    failure: NotebookFailed | None = None
    # the processes the kernels fork from: one per thread setting a kernel can get, started with the first notebook
    settings = [kernel_environment(t) for t in thread_settings(jobs, cores, chosen)]
    warm = WarmKernels(settings) if warm_kernels else None
    try:
        while pending or running:
            # start notebooks whose upstream stages are done while threads are free: the one heading the
            # longest chain of notebooks first (schedule.chain_lengths), else in the book's order
            while failure is None:
                ready = sorted((s for s in pending if all(d in done for d in deps[s.stem])),
                               key=lambda s: (-chain[s.stem], index[s.stem]))
                digests = {s.stem: plan(s) for s in ready}  # an unchanged notebook is skipped at once
                pending = [s for s in pending if s.stem not in done]
                if any(d is None for d in digests.values()):
                    continue  # skips may have made more notebooks ready: skip all there is first
                if not ready:
                    break
                if chosen:
                    threads = 0 if len(running) < jobs else None
                else:
                    threads = threads_for_next(jobs, cores, [t for *_, t in running.values()], len(ready))
                if threads is None:
                    break
                stage = ready[0]
                pending.remove(stage)
                log(f"{head(stage)} running ...")
                (records / f"{stage.stem}.json").unlink(missing_ok=True)
                env = kernel_environment(threads)
                args = (stage, params[stage.stem], book_src / f"{stage.toc_file}.ipynb", root, progress,
                        env if warm is None else warm.environment(env))
                running[submit(pool, args)] = (stage, digests[stage.stem], time.time(), threads)
            if not running:
                break  # a failure stopped new starts, or nothing is left that can start
            ended, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(ended, key=lambda f: index[running[f][0].stem]):  # in the book's order
                stage, digest, t0, _ = running.pop(future)
                try:
                    error = future.result()
                except Exception as exc:  # the worker process itself died
                    error = f"{type(exc).__name__}: {exc}"
                failed = finished(stage, digest, t0, error)  # recorded even after a failure
                failure = failure or failed
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if warm is not None:
            warm.stop()
        results = [done[s.stem] for s in stages if s.stem in done]
        _write_timings(timings, results, None)
    if failure is not None:
        raise failure

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
    ap.add_argument("--cold-kernels", action="store_true",
                    help="start every notebook's kernel from scratch, not forked from a process with the libraries imported")
    ap.add_argument("--jobs", type=int,
                    help="notebooks run at once when the stages they read are done (default: the profile's jobs, else 1)")
    args = ap.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: at least one notebook must run at a time")
    try:
        run(args.profile, root=args.root, run_dir=args.run_dir, toc=args.toc, output=args.output, force=args.force,
            build=not args.no_build, only=args.only.split(",") if args.only else None, progress=sys.stderr.isatty(),
            jobs=args.jobs, warm_kernels=not args.cold_kernels)
    except (ProfileError, FileNotFoundError, schedule.DependencyError) as exc:
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
