"""Profiles: the parameters the book's pipeline injects into each notebook.

A profile is ``profiles/<name>.yaml``: an ``all:`` section applied to every notebook that declares
the key, and one section per notebook stem that overrides it::

    all:                       # applied to every notebook that declares the key
      seed: 0                  # reason
    04_unet:                   # one section per notebook stem
      base_width: 16           # thesis 64; 2 CPU cores

A profile may name a ``base`` profile and change only its *scale*: where the data come from and how
many, the focus window, crop and patch sizes, step counts, intervals, batch sizes (at least 2) and
the device (:data:`SCALE_KEYS`). Any other key would change the method of the base, so it is an
error naming the profile, the section and the key. ``smoke-full`` runs the ``full`` profile this
way: every method setting of the thesis-scale run, on a tiny simulated registry for a few steps.

A profile may instead ``extend`` another with more notebooks (``study`` extends ``book``)::

    extends: book                                  # the book's notebooks and values, in runs/book
    part: "The study's longer experiments"         # the caption of the added notebooks in its book
    notebooks: [notebooks/03b_ablation]            # toc entries of the added notebooks
    03b_ablation:
      steps: 300                                   # reason

A top-level ``jobs: N`` says how many notebooks the pipeline runs at once (:mod:`vstain.book.pipeline`);
a profile built on another takes its value unless it sets its own.

An extending profile runs in the extended profile's run directory with every one of its values, so after ``make book``
the extended notebooks are reused as they are and only the added ones run; it may set values for the
added notebooks only (anything else would rerun the extended book with other settings).

:func:`resolve_parameters` checks every key against the parameters each notebook declares
(``papermill.inspect_notebook``) and returns what papermill injects; :mod:`vstain.book.pipeline`
runs the notebooks with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

RESERVED = ("run_dir",)  # injected by the pipeline, never set by a profile
EXTENDS_KEYS = ("extends", "part", "notebooks")  # top-level keys of a profile that adds notebooks

# What a profile derived from a base may change: the scale of the run, never its method.
SCALE_KEYS = frozenset({
    # the data: source and size, and how many volumes the denoising baselines see
    "source", "n_per_structure", "fov_shape", "crop_yx", "bm3d_max_volumes", "nlm_max_volumes",
    # the in-focus window, crops, patches and prediction tiles
    "window", "crop", "patch", "train_stride", "n2v_patch_size", "n2v_tile_size", "n2v_tile_overlap",
    # how long each stage trains and how much it draws
    "max_steps", "iterations", "epochs", "n2v_epochs", "n2v_steps_per_epoch", "n2v_n_val_patches",
    "samples", "val_samples", "patches_per_class", "pool_per_class",
    # validation and checkpoint intervals
    "val_every", "ckpt_every",
    # batch sizes (see MIN_BATCH)
    "batch_size", "n2v_batch_size",
    # where it runs
    "device",
})
BATCH_KEYS = ("batch_size", "n2v_batch_size")
MIN_BATCH = 2  # a batch of one hides batch-axis bugs and breaks BatchNorm's training statistics


class ProfileError(ValueError):
    """A profile that does not fit the notebooks (unknown key, unknown notebook, bad format)."""


@dataclass
class Profile:
    """A loaded profile; for a derived one, its base's values with its own laid over them."""

    name: str
    path: Path
    common: dict[str, Any] = field(default_factory=dict)  # the `all:` section
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # stem -> values
    base: str | None = None  # the profile this one changes the scale of
    extends: str | None = None  # the profile this one adds notebooks to (same run directory)
    part: str = ""  # caption of the added notebooks in the book's table of contents
    notebooks: tuple[str, ...] = ()  # toc entries of the added notebooks, e.g. "notebooks/03b_ablation"
    jobs: int = 1  # notebooks the pipeline runs at once (its --jobs), from ``jobs:`` or the profile it builds on


def _read_jobs(name: str, path: Path, data: dict[str, Any]) -> int | None:
    jobs = data.pop("jobs", None)
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ProfileError(f"profile '{name}' ({path}): 'jobs' must be a whole number of at least 1, got {jobs!r}")
    return jobs


def _read_sections(path: Path) -> tuple[str | None, int | None, dict[str, dict[str, Any]]]:
    """``(base, jobs, {section: values})`` of one profile file, ``all`` included (and, when it
    extends another, the ``extends``/``part``/``notebooks`` entries as they are)."""
    name = path.stem
    if not path.exists():
        avail = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ProfileError(f"profile '{name}': no file {path} (profiles here: {', '.join(avail) or 'none'})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ProfileError(f"profile '{name}' ({path}): expected a mapping of sections, got {type(data).__name__}")
    base, jobs = data.pop("base", None), _read_jobs(name, path, data)
    if base is not None and not isinstance(base, str):
        raise ProfileError(f"profile '{name}' ({path}): 'base' must name a profile, got {base!r}")
    sections = {}
    for section, values in data.items():
        if section in EXTENDS_KEYS:
            sections[section] = values
            continue
        values = values or {}
        if not isinstance(values, dict):
            raise ProfileError(f"profile '{name}' ({path}): section '{section}' must be a mapping of key: value")
        sections[str(section)] = dict(values)
    return base, jobs, sections


def check_scale_only(name: str, path: Path, base: str, sections: dict[str, dict[str, Any]]) -> None:
    """Raise unless every key of a derived profile is a scale key with a sensible value.

    Raises:
        ProfileError: a key outside :data:`SCALE_KEYS` (it would change the base's method), or a
            batch size below :data:`MIN_BATCH`.
    """
    for section, values in sections.items():
        for key, value in values.items():
            where = f"profile '{name}' ({path}): '{section}: {key}'"
            if key not in SCALE_KEYS:
                raise ProfileError(
                    f"{where} would change a method setting of its base profile '{base}'; a profile with "
                    f"a base may set only scale keys: {', '.join(sorted(SCALE_KEYS))}")
            if key in BATCH_KEYS and (not isinstance(value, int) or value < MIN_BATCH):
                raise ProfileError(f"{where} must be an integer of at least {MIN_BATCH}, got {value!r}")


def load_profile(path: Path, _seen: tuple[Path, ...] = ()) -> Profile:
    """Read a profile file and, if it names a ``base``, lay its values over the base's.

    A derived profile's ``all:`` key replaces the base's value for that key in every notebook
    (the base's ``all:`` and its per-notebook sections alike); its per-notebook keys replace the
    base's for that notebook.

    Raises:
        ProfileError: a missing file, a section that is not a mapping, a base that is missing or
            leads back to the profile, or a derived profile that sets a non-scale key.
    """
    path = Path(path)
    if path.resolve() in _seen:
        raise ProfileError(f"profile '{path.stem}' ({path}): its base chain comes back to itself")
    base_name, jobs, own = _read_sections(path)
    if "extends" in own:
        return _load_extending(path, base_name, jobs, own, _seen)
    if any(k in own for k in EXTENDS_KEYS):
        raise ProfileError(f"profile '{path.stem}' ({path}): 'part' and 'notebooks' need 'extends: <profile>'")
    if base_name is None:
        return Profile(path.stem, path, own.pop("all", {}), own, jobs=jobs or 1)
    check_scale_only(path.stem, path, base_name, own)
    base = load_profile(path.parent / f"{base_name}.yaml", (*_seen, path.resolve()))
    common = {**base.common, **own.get("all", {})}
    sections = {}
    for stem in {**base.sections, **own}:
        if stem == "all":
            continue
        values = {k: v for k, v in base.sections.get(stem, {}).items() if k not in own.get("all", {})}
        sections[stem] = {**values, **own.get(stem, {})}
    return Profile(path.stem, path, common, sections, base_name, jobs=jobs or base.jobs)


def _load_extending(path: Path, base_name: str | None, jobs: int | None, own: dict[str, Any],
                    seen: tuple[Path, ...]) -> Profile:
    """A profile that adds notebooks to the one it ``extends`` (see the module docstring).

    Raises:
        ProfileError: also a ``base``, an ``all:`` section, no ``notebooks`` list, or a section for a
            notebook it does not add (it would change the extended profile's notebooks).
    """
    name, extends = path.stem, own.pop("extends")
    part, notebooks = own.pop("part", ""), own.pop("notebooks", None)
    where = f"profile '{name}' ({path})"
    if base_name is not None or "all" in own:
        raise ProfileError(f"{where}: a profile that extends '{extends}' takes its values as they are: "
                           "no 'base' and no 'all:' section")
    if not isinstance(notebooks, list) or not notebooks or not all(isinstance(n, str) for n in notebooks):
        raise ProfileError(f"{where}: 'notebooks' must list the toc entries it adds, e.g. [notebooks/03b_ablation]")
    added = {Path(n).name for n in notebooks}
    for section in own:
        if section not in added:
            raise ProfileError(f"{where}: section '{section}' is not one of the notebooks it adds "
                               f"({', '.join(sorted(added))}); the notebooks of '{extends}' keep its values")
    parent = load_profile(path.parent / f"{extends}.yaml", (*seen, path.resolve()))
    return Profile(name, path, dict(parent.common), {**parent.sections, **own}, parent.base,
                   extends=parent.extends or extends, part=str(part), notebooks=(*parent.notebooks, *notebooks),
                   jobs=jobs or parent.jobs)


def declared_parameters(notebook: Path) -> dict[str, str]:
    """Parameter name -> default (source text) of a notebook's ``parameters`` cell."""
    import papermill

    return {name: p["default"] for name, p in papermill.inspect_notebook(str(notebook)).items()}


def resolve_parameters(
    profile: Profile, stages: Sequence, run_dir: str, declared: dict[str, dict[str, str]] | None = None
) -> dict[str, dict[str, Any]]:
    """The parameters papermill injects into each notebook.

    ``all:`` keys go to every notebook that declares them, per-notebook sections override them and
    ``run_dir`` is always injected.

    Args:
        profile: from :func:`load_profile`.
        stages: the book's notebooks (each with ``stem`` and ``source``), in run order.
        run_dir: the run directory injected into every notebook.
        declared: stem -> declared parameters; read from the notebooks when None.

    Raises:
        ProfileError: a section for a notebook the book does not have; a key the target notebook
            does not declare; an ``all:`` key no notebook declares; a profile that sets ``run_dir``;
            a notebook without ``run_dir`` in its parameters cell.
    """
    declared = declared if declared is not None else {s.stem: declared_parameters(s.source) for s in stages}
    stems = [s.stem for s in stages]
    where = f"profile '{profile.name}' ({profile.path})"
    for section in profile.sections:
        if section not in stems:
            raise ProfileError(
                f"{where}: section '{section}' names no notebook of the book (notebooks: {', '.join(stems)})")
    for key in RESERVED:
        if key in profile.common or any(key in v for v in profile.sections.values()):
            raise ProfileError(f"{where}: '{key}' is set by the pipeline (runs/<profile>); remove it from the profile")
    for key in profile.common:
        if not any(key in declared[s] for s in stems):
            raise ProfileError(f"{where}: key '{key}' in 'all:' is declared by no notebook ({', '.join(stems)})")
    resolved = {}
    for stage in stages:
        params = declared[stage.stem]
        if "run_dir" not in params:
            raise ProfileError(f"notebook {stage.source}: its parameters cell does not declare run_dir")
        for key in profile.sections.get(stage.stem, {}):
            if key not in params:
                raise ProfileError(
                    f"{where}: notebook '{stage.stem}' declares no parameter '{key}' "
                    f"(it declares: {', '.join(sorted(params))})"
                )
        values = {k: v for k, v in profile.common.items() if k in params}
        values.update(profile.sections.get(stage.stem, {}))
        values["run_dir"] = run_dir
        resolved[stage.stem] = values
    return resolved
