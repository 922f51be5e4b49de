"""The run directory: how notebooks pass results to each other.

Each notebook (a *stage*) writes only into ``runs/<profile>/<stage>/`` and reads only the upstream
stage folders it names. A stage is complete when its ``manifest.json`` exists; that file is written
last, by rename, and records the resolved parameters, the hashes of the inputs, the outputs with
sizes and SHA-256, package versions, the device and the wall time.
"""
from __future__ import annotations

import ast
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from vstain.volumes import sha256

MANIFEST = "manifest.json"


def repo_root() -> Path:
    """The project's root: the nearest folder above this package that holds ``pyproject.toml``."""
    here = Path(__file__).resolve().parent
    for p in (here, *here.parents):
        if (p / "pyproject.toml").exists():
            return p
    return Path.cwd()


RUNS_ENV = "VSTAIN_RUNS"  # a folder that stands in for the project's runs/ (the tests set it)


def resolve(run_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """A run directory as an absolute path; relative paths are taken from the project's root (or
    ``root``), so a notebook finds the same folder whether papermill, nbval or JupyterLab runs it.
    When the environment variable ``VSTAIN_RUNS`` is set, a relative ``runs/<name>`` resolves to
    ``$VSTAIN_RUNS/<name>`` instead: the test suite runs the notebooks there and never touches a
    user's ``runs/``."""
    p = Path(run_dir).expanduser()
    if p.is_absolute():
        return p
    if os.environ.get(RUNS_ENV) and p.parts[:1] == ("runs",):
        return Path(os.environ[RUNS_ENV]).resolve().joinpath(*p.parts[1:])
    return Path(root or repo_root()) / p


def stage_dir(run_dir: str | os.PathLike, stage: str, *, clean: bool = False) -> Path:
    """The folder a stage writes into, created if needed. ``clean`` removes an old manifest so an
    interrupted rerun can never look complete."""
    d = resolve(run_dir) / stage
    d.mkdir(parents=True, exist_ok=True)
    if clean and (d / MANIFEST).exists():
        (d / MANIFEST).unlink()
    return d


def require(run_dir: str | os.PathLike, stage: str) -> Path:
    """The folder of a finished upstream stage, or a clear error that says which notebook to run."""
    d = resolve(run_dir) / stage
    if not (d / MANIFEST).exists():
        raise FileNotFoundError(
            f"stage '{stage}' has not finished in run directory '{resolve(run_dir)}' "
            f"(no {d / MANIFEST}): run notebooks/{stage}.ipynb first with the same run_dir "
            f"(or `make book PROFILE=...`)."
        )
    return d


def optional(run_dir: str | os.PathLike, stage: str) -> Path | None:
    """The folder of a finished upstream stage that a notebook can do without, or None when that
    stage has not finished."""
    d = resolve(run_dir) / stage
    return d if (d / MANIFEST).exists() else None


def _versions() -> dict[str, str]:
    """Installed versions of the packages a stage may use, read from metadata (no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("numpy", "torch", "lightning", "careamics", "monai", "quilt3", "tifffile", "scikit-image"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _device() -> str:
    import sys

    torch = sys.modules.get("torch")  # only ask CUDA when the stage already imported torch
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _parameter_assignments(notebook: str | os.PathLike) -> list[tuple[str, ast.expr | None]]:
    """``(name, value)`` of every assignment in the notebook's ``parameters`` cell, in order."""
    for cell in json.loads(Path(notebook).read_text())["cells"]:
        if cell["cell_type"] == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            out = []
            for node in ast.parse(source).body:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                    node, ast.AnnAssign) else []
                out += [(t.id, node.value) for t in targets if isinstance(t, ast.Name)]
            return out
    return []


def declared_parameters(notebook: str | os.PathLike) -> list[str]:
    """The names that the notebook's ``parameters`` cell assigns, in order: the list
    ``papermill.inspect_notebook`` gives (a test checks every notebook), read with :mod:`ast` so a
    stage's kernel need not import papermill and nbformat (~1.4 s) to write its manifest."""
    return list(dict.fromkeys(name for name, _ in _parameter_assignments(notebook)))


def parameter_defaults(notebook: str | os.PathLike) -> dict[str, Any]:
    """The literal values that the notebook's ``parameters`` cell assigns (a name bound to anything
    but a literal is left out)."""
    out = {}
    for name, value in _parameter_assignments(notebook):
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError):
            continue
    return out


def notebook_parameters(stage: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The value in ``namespace`` (a notebook's ``globals()``) of every parameter that the stage's
    notebook (``notebooks/<stage>.ipynb``) declares in its ``parameters`` cell, as papermill lists
    them, so a manifest records all of them.

    Raises:
        FileNotFoundError: there is no notebook of that name.
        KeyError: the namespace lacks a declared parameter.
    """
    nb = repo_root() / "notebooks" / f"{stage}.ipynb"
    if not nb.exists():
        raise FileNotFoundError(f"no notebook {nb} for stage '{stage}': a stage folder is named after its notebook")
    names = declared_parameters(nb)
    missing = [n for n in names if n not in namespace]
    if missing:
        raise KeyError(f"{nb.name} declares parameter(s) {missing} that the namespace lacks")
    return {n: namespace[n] for n in names}


def finish(
    stage_path: str | os.PathLike,
    namespace: Mapping[str, Any],
    started: float,
    inputs: Iterable[str | os.PathLike] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the stage's ``manifest.json`` (last, by rename) and return it.

    Args:
        stage_path: the stage folder from :func:`stage_dir` (named after its notebook).
        namespace: the notebook's ``globals()``; every parameter the notebook declares is recorded
            with its resolved value (:func:`notebook_parameters`).
        started: ``time.time()`` when the stage began, for the wall time.
        inputs: upstream files or stage folders; a folder is hashed by its manifest.
        extra: anything else worth keeping (e.g. headline metrics).
    """
    params = notebook_parameters(Path(stage_path).name, namespace)
    d = Path(stage_path)
    ins = {}
    for p in inputs:
        p = Path(p)
        f = p / MANIFEST if p.is_dir() else p
        ins[str(p)] = sha256(f) if f.exists() else None
    outs = {}
    for f in sorted(d.rglob("*")):
        if f.is_file() and f.name != MANIFEST and not f.name.endswith(".tmp"):
            outs[str(f.relative_to(d))] = {"bytes": f.stat().st_size, "sha256": sha256(f)}
    manifest = {
        "stage": d.name,
        "params": params,
        "inputs": ins,
        "outputs": outs,
        "versions": _versions(),
        "device": _device(),
        "wall_time_s": round(time.time() - started, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra or {}),
    }
    tmp = d / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(d / MANIFEST)
    return manifest


def load_manifest(stage_path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(stage_path) / MANIFEST).read_text())
