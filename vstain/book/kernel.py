"""Running one notebook of the book: papermill into its executed copy, errors judged by the
book's rules, progress bars stored as a terminal shows them, and the same in a worker process
when several notebooks run side by side (:mod:`vstain.book.pipeline`'s ``--jobs``)."""
from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One notebook of the book: ``stem`` (``04_unet``), its source and its place in the toc."""

    stem: str
    source: Path  # the stored notebook (no outputs)
    toc_file: str  # the toc entry, e.g. "notebooks/04_unet"


class NotebookFailed(RuntimeError):
    """A notebook raised; ``executed`` is its executed copy with the failing cell's output."""

    def __init__(self, stage: str, executed: Path, detail: str):
        self.stage, self.executed, self.detail = stage, executed, detail
        super().__init__(f"notebook {stage} failed: {detail}\n  executed notebook: {executed}")


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

    The kernel is stopped at once when its last cell has ended, not asked to shut down: by then
    every cell has returned and every file a stage writes is closed (its ``manifest.json`` last),
    and a graceful shutdown of a kernel that holds torch and Lightning took 2.0 s after the last
    cell and ~2 CPU-s more (tearing down the interpreter), against 0.1 s stopped.

    Raises:
        NotebookFailed: a cell not tagged ``raises-exception`` raised.
    """
    import papermill
    from papermill.engines import papermill_engines
    from papermill.iorw import write_ipynb
    from papermill.utils import chdir

    from . import forkserver

    executed.parent.mkdir(parents=True, exist_ok=True)
    nb = papermill.execute_notebook(
        str(stage.source), str(executed), parameters=params, prepare_only=True, progress_bar=False, cwd=str(cwd)
    )
    kernel = papermill_engines.nb_kernel_name(engine_name=None, nb=nb)
    warm = {}
    if os.environ.get(forkserver.ADDRESS):  # the pipeline's warm process forks the kernel
        warm = {"kernel_manager_class": forkserver.ForkKernelManager}
    with chdir(str(cwd)):
        nb = papermill_engines.execute_notebook_with_engine(
            None, nb, kernel_name=kernel, input_path=str(stage.source), output_path=str(executed),
            progress_bar=progress, log_output=False, start_timeout=120, shutdown_kernel="immediate", **warm,
        )
    write_ipynb(render_carriage_returns(nb), str(executed))
    bad = _error_cells(nb)
    if bad:
        index, what = bad[0]
        raise NotebookFailed(stage.stem, executed, f"cell {index} raised {what}")


def threads_for_next(jobs: int, cores: int, running: list[int], ready: int) -> int | None:
    """CPU threads for the next notebook to start when up to ``jobs`` notebooks share ``cores``
    (``running``: the threads of those already running; ``ready``: how many could start now, this
    one included), or None when it must wait for one to end.

    A notebook alone (nothing running, nothing else ready) gets every core, as with one job;
    otherwise each gets an equal share, ``cores // jobs`` (at least one), so that kernels side by side
    run no more threads than there are cores unless ``jobs`` exceeds them (torch's OpenMP threads
    spin while they wait for each other: two oversubscribed kernels each ran about 4x slower).
    """
    if len(running) >= jobs:
        return None
    if not running and ready == 1:
        return cores
    share = max(1, cores // jobs)
    return share if sum(running) + share <= max(cores, share * jobs) else None


def thread_settings(jobs: int, cores: int, chosen: bool) -> list[int]:
    """Every thread count :func:`threads_for_next` can give a kernel (``chosen``: the threads are
    torch's default or the user's, 0), so that each can have its warm process
    (:class:`vstain.book.forkserver.WarmKernels`)."""
    return [0] if chosen else sorted({cores, max(1, cores // jobs)})


def kernel_environment(threads: int) -> dict[str, str]:
    """What a kernel's environment gets for ``threads`` CPU threads (torch reads ``OMP_NUM_THREADS``
    when it starts); nothing for 0 (torch's default)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}


_ADDED: dict[str, str] = {}  # what this process added to its environment for its last kernel


def _execute_guarded(stage: Stage, params: dict[str, Any], executed: Path, cwd: Path, progress: bool,
                     env: dict[str, str]) -> str | None:
    """:func:`execute` with ``env`` added for its kernel (in place of an earlier task's); what went
    wrong, or None."""
    for key in _ADDED.keys() - env.keys():
        os.environ.pop(key, None)
    os.environ.update(env)
    _ADDED.clear()
    _ADDED.update(env)
    try:
        execute(stage, params, executed, cwd=cwd, progress=progress)
    except NotebookFailed as exc:
        return exc.detail
    except Exception as exc:  # kernel died, timeout, bad parameters: same treatment
        return f"{type(exc).__name__}: {exc}"
    return None


def submit(pool: ProcessPoolExecutor | None, args: tuple) -> Future:
    """Run one notebook in ``pool``, or here and now when there is no pool (one job at a time)."""
    if pool is not None:
        return pool.submit(_execute_guarded, *args)
    future: Future = Future()
    future.set_result(_execute_guarded(*args))
    return future
