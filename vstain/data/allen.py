"""The Allen Cell hiPSC single-cell image dataset through quilt3 (Viana et al., Nature 2023;
thesis 2.1): a registry (``s3://allencell``, or a local ``file://`` registry in the same layout) ->
``metadata.csv`` -> one row per FOV -> one :class:`FOV` at a time.

One FOV becomes a brightfield stack ``[1, Z, Y, X]`` and a six-channel target ``[6, Z, Y, X]`` that
holds NaN in the channels the FOV does not carry (each FOV is one cell line: one FP-tagged
structure plus the DNA and membrane dyes). This module is the project's only importer of quilt3.

Images must be 16-bit (the Allen FOVs are uint16 camera counts; a float image in [0, 1] or an 8-bit
one is another normalisation that would pass silently into the z-scores): another dtype is an error
unless ``dtypes`` allows it. A blank target channel (one value everywhere, e.g. all zeros) is
treated as not carried, with a warning naming the file and channel; a blank brightfield, or a FOV
whose three target channels are all blank, is an error.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from vstain.channels import (ALLEN_PACKAGE, ALLEN_PIXEL_SIZE_ZYX, ALLEN_REGISTRY, CHANNEL_COLUMNS, DEFAULT_GENE_MAP,

    DEFAULT_STRUCTURES, LABEL_CHANNELS, TARGETS)
from vstain.volumes import read_ome

ALLEN_DTYPES = ("uint16",)  # the Allen FOVs (and the simulator's) are 16-bit camera counts
OFFLINE_HINT = (
    "the real Allen dataset needs network access to {registry}, which this machine does not have; "
    "the default source 'synthetic' (the embedded simulator) runs offline"
)


class RegistryUnreachableError(ConnectionError):
    """A quilt3 registry that cannot be reached (no network, a wrong bucket or path)."""


# ---------------------------------------------------------------------------------------------
# quilt3 adapter: this module is the only importer of quilt3. The default path never calls home:
# quilt3 8 decides at import whether to send usage metrics (QUILT_DISABLE_USAGE_METRICS, read
# when its API decorators are built), so the variable is set before the import and the class flag
# after it, in case someone imported quilt3 first. QUILT_MINIMIZE_STDOUT silences its progress
# bars. quilt3.config() (which fetches the open-data catalogue's settings) is never called.
# ---------------------------------------------------------------------------------------------
def _quilt3():
    os.environ.setdefault("QUILT_DISABLE_USAGE_METRICS", "true")
    os.environ.setdefault("QUILT_MINIMIZE_STDOUT", "true")
    import quilt3
    from quilt3.telemetry import ApiTelemetry

    ApiTelemetry.telemetry_disabled = True
    return quilt3


def registry_uri(registry: str | os.PathLike) -> str:
    """``s3://bucket`` stays as it is; a local path or ``file://`` URI becomes an absolute ``file://`` URI."""
    r = str(registry)
    if r.startswith("s3://"):
        return r.rstrip("/")
    if r.startswith("file://"):
        r = urlparse(r).path
    return Path(r).expanduser().resolve().as_uri()


def publish_local(folder: str | os.PathLike, registry_dir: str | os.PathLike, package: str = ALLEN_PACKAGE) -> str:
    """Publish a folder laid out like the Allen package as a local quilt3 registry.

    Args:
        folder: holds ``metadata.csv`` and the files its ``fov_path`` column names (package keys
            ``<folder>/<file>`` relative to ``folder``), plus any extra files.
        registry_dir: the registry's root, created if needed. A ``folder`` outside it is copied
            to ``registry_dir/<package>/`` first (where ``push`` puts files in an S3 registry), so
            the registry is self-contained; a ``folder`` inside it is used in place.
        package: the package name, ``"<namespace>/<name>"``.

    Returns:
        The registry URI (``file://...``): ``quilt3.Package.browse(package, registry=uri)`` reads
        it offline.
    """
    folder, reg = Path(folder).resolve(), Path(registry_dir).resolve()
    if not (folder / "metadata.csv").is_file():
        raise FileNotFoundError(f"publish_local: {folder} has no metadata.csv (the Allen package layout)")
    if folder == reg:
        raise ValueError(f"publish_local: the folder {folder} cannot be the registry root itself; "
                         "put the package files in a subfolder (e.g. <registry>/<package>)")
    reg.mkdir(parents=True, exist_ok=True)
    if reg not in folder.parents:
        dest = reg / package
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(folder, dest)
        folder = dest
    pkg = _quilt3().Package()
    pkg.set_dir(".", str(folder))
    pkg.build(package, registry=reg.as_uri(), message="vstain.data.allen.publish_local")
    return reg.as_uri()


def _check_reachable(uri: str, timeout: float) -> None:
    """Fail fast, with the offline hint, when an S3 registry cannot be reached: a TCP connect to
    the bucket's endpoint in a daemon thread, so neither a slow resolver nor botocore's retries
    can hang the caller for minutes."""
    host = f"{urlparse(uri).netloc}.s3.amazonaws.com"
    result: list[BaseException | None] = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(None)
        except BaseException as e:  # reported to the caller below
            result.append(e)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    err = result[0] if result else TimeoutError(f"no answer from {host} within {timeout:.0f} s")
    if err is not None:
        raise RegistryUnreachableError(
            f"cannot reach registry {uri} ({host}:443: {err}): " + OFFLINE_HINT.format(registry=uri)
        ) from err


def open_package(registry: str | os.PathLike = ALLEN_REGISTRY, package: str = ALLEN_PACKAGE, timeout: float = 5.0):
    """Browse a quilt3 package (its manifest only; files are fetched later, one by one).

    Args:
        registry: ``s3://bucket`` or a local registry (``file://`` URI or path).
        package: ``"<namespace>/<name>"``.
        timeout: seconds to wait for an S3 endpoint before giving up.

    Raises:
        RegistryUnreachableError: the registry or the package cannot be reached; for S3 the
            message says the real dataset needs network access and names the offline default.
    """
    uri = registry_uri(registry)
    if uri.startswith("s3://"):
        os.environ.setdefault("AWS_METADATA_SERVICE_TIMEOUT", "1")  # botocore's credential probe
        os.environ.setdefault("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "1")
        _check_reachable(uri, timeout)
    else:
        root = Path(urlparse(uri).path)
        latest = root / ".quilt" / "named_packages" / package / "latest"
        if not latest.is_file():
            raise RegistryUnreachableError(
                f"local registry {uri} holds no package '{package}' (no {latest}); "
                "publish one with vstain.data.allen.publish_local or vstain.data.registry.write_registry"
            )
    q = _quilt3()
    try:
        return q.Package.browse(package, registry=uri)
    except Exception as e:  # botocore, quilt3 and OS errors all mean the same thing to the caller
        hint = OFFLINE_HINT.format(registry=uri) if uri.startswith("s3://") else "check the registry path"
        raise RegistryUnreachableError(
            f"cannot browse package '{package}' in {uri} ({type(e).__name__}: {e}): {hint}") from e


def fetch(pkg, key: str, cache_dir: str | os.PathLike) -> Path:
    """The local path of package file ``key``: read in place for a local registry, else downloaded
    once into ``cache_dir/<key>`` (skipped when a file of the right size is already there)."""
    try:
        entry = pkg[key]
    except KeyError:
        raise FileNotFoundError(f"the package has no file '{key}' (named in metadata.csv)") from None
    if entry.physical_key.is_local():
        return Path(entry.physical_key.path)
    dest = Path(cache_dir) / key
    if dest.is_file() and dest.stat().st_size == entry.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        entry.fetch(str(part))
    except Exception as e:
        raise RegistryUnreachableError(f"cannot download '{key}' ({type(e).__name__}: {e})") from e
    part.replace(dest)
    return dest


# ---------------------------------------------------------------------------------------------
# metadata.csv: one row per cell -> one row per FOV -> N FOVs per structure
# ---------------------------------------------------------------------------------------------
def read_metadata(pkg, cache_dir: str | os.PathLike) -> pd.DataFrame:
    """The package's ``metadata.csv`` (one row per cell)."""
    return pd.read_csv(fetch(pkg, "metadata.csv", cache_dir), low_memory=False)


def fov_table(meta: pd.DataFrame, gene_map: dict[str, str] = DEFAULT_GENE_MAP,
              source: str = "metadata.csv") -> pd.DataFrame:
    """One row per FOV: non-outlier cells (``outlier == "No"`` where that column exists), duplicates
    on ``FOVId`` dropped, plus ``fov_id`` (str) and ``structure`` (the TARGETS key of the gene, or
    NaN for genes outside ``gene_map``)."""
    need = ["FOVId", "fov_path", "structure_name", *CHANNEL_COLUMNS.values()]
    missing = [c for c in need if c not in meta.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; the Allen layout needs {need}")
    check_structures([], gene_map)
    df = meta
    if "outlier" in df.columns:
        df = df[df["outlier"].astype(str).str.strip().str.lower() == "no"]
    cells = df.groupby("FOVId").size()
    df = df.drop_duplicates("FOVId").copy()
    df["cells"] = df["FOVId"].map(cells).astype(int)
    df.insert(0, "fov_id", df["FOVId"].astype(str))
    df.insert(1, "gene", df["structure_name"].astype(str))
    df.insert(2, "structure", df["gene"].map(gene_map))
    return df.sort_values("FOVId", kind="stable").reset_index(drop=True)


def check_structures(structures: Sequence[str], gene_map: dict[str, str], n_per_structure: int = 1) -> None:
    """Fail early on an unknown structure name or a bad count."""
    if int(n_per_structure) < 1:
        raise ValueError(f"n_per_structure must be >= 1, got {n_per_structure}")
    bad = sorted(set(gene_map.values()) - set(TARGETS[2:]))
    if bad:
        raise ValueError(f"gene_map maps to unknown target(s) {bad}; tagged structures go to {TARGETS[2:]}")
    if isinstance(structures, str):
        raise ValueError(f"structures must be a list of genes, got the string {structures!r}")
    unknown = [s for s in structures if s not in gene_map]
    if unknown:
        raise ValueError(f"unknown structure name(s) {unknown}: the gene map knows {sorted(gene_map)} "
                         f"(mapped to {TARGETS[2:]}); pass gene_map= to add genes")


def select_fovs(fovs: pd.DataFrame, n_per_structure: int, structures: Sequence[str] = DEFAULT_STRUCTURES,
                gene_map: dict[str, str] = DEFAULT_GENE_MAP, seed: int = 0) -> pd.DataFrame:
    """``n_per_structure`` FOVs of each gene in ``structures`` (``structure_name`` values), drawn
    without replacement with a seeded generator; fewer (with a warning) where fewer exist."""
    check_structures(structures, gene_map, n_per_structure)
    rng = np.random.default_rng(seed)
    picks = []
    for gene in structures:
        rows = fovs[fovs["gene"] == gene]
        if rows.empty:
            raise ValueError(f"structure '{gene}' has no (non-outlier) FOV in the metadata; present: "
                             f"{sorted(fovs['gene'].unique())}")
        if len(rows) < n_per_structure:
            warnings.warn(f"structure '{gene}': only {len(rows)} FOVs, fewer than n_per_structure={n_per_structure}")
        take = rng.choice(len(rows), size=min(n_per_structure, len(rows)), replace=False)
        picks.append(rows.iloc[np.sort(take)])
    return pd.concat(picks, ignore_index=True)


def _channel(row, key: str, n_channels: int, path) -> int:
    col = CHANNEL_COLUMNS[key]
    if col not in row.index:
        raise ValueError(f"{path}: metadata.csv has no column '{col}' (channel index of {key})")
    v = row[col]
    if pd.isna(v) or float(v) != int(float(v)):
        raise ValueError(f"{path}: FOV {row['fov_id']} has no valid '{col}' ({v!r}): a 0-based channel index is needed")
    i = int(float(v))
    if not 0 <= i < n_channels:
        raise ValueError(f"{path}: '{col}' = {i} is out of range for an image with {n_channels} channels "
                         f"(FOV {row['fov_id']}; valid 0..{n_channels - 1})")
    return i


def _blank(channel: np.ndarray) -> bool:
    return channel.size == 0 or channel.min() == channel.max()


def assemble(vol: np.ndarray, row, path="",
             dtypes: Sequence[str] | None = ALLEN_DTYPES) -> tuple[np.ndarray, np.ndarray]:
    """Brightfield ``[1, Z, Y, X]`` and six-channel target ``[6, Z, Y, X]`` (float32, NaN in the
    channels the FOV does not carry) from a ``[C, Z, Y, X]`` stack and its metadata row.

    Args:
        vol: the FOV's stack ``[C, Z, Y, X]`` as read from ``path``.
        row: its :func:`fov_table` row (channel columns, ``fov_id``, ``structure``).
        path: the file, for messages.
        dtypes: allowed image dtypes (default ``("uint16",)``, the Allen data); None allows any.

    Raises:
        ValueError: naming ``path``: a dtype outside ``dtypes``, a bad channel index, a blank
            brightfield, or no target channel with signal. A single blank target channel only
            warns and stays NaN (not carried).
    """
    if dtypes is not None and vol.dtype.name not in tuple(dtypes):
        raise ValueError(f"{path}: image dtype {vol.dtype.name}, expected one of {tuple(dtypes)} (the Allen FOVs are "
                         f"uint16 camera counts); pass dtypes=None or include '{vol.dtype.name}' to load it anyway")
    c = vol.shape[0]
    idx = {k: _channel(row, k, c, path) for k in CHANNEL_COLUMNS}
    if _blank(vol[idx["brightfield"]]):
        raise ValueError(f"{path}: the brightfield channel ({CHANNEL_COLUMNS['brightfield']} = {idx['brightfield']}) "
                         f"of FOV {row['fov_id']} is blank (one value everywhere)")
    bf = vol[idx["brightfield"]][None].astype(np.float32)
    target = np.full((len(TARGETS), *vol.shape[1:]), np.nan, np.float32)
    carried = 0
    for key, name in (("dna", "dna"), ("membrane", "membrane"), ("struct", row["structure"])):
        channel = vol[idx[key]]
        if _blank(channel):
            warnings.warn(f"{path}: target channel '{name}' ({CHANNEL_COLUMNS[key]} = {idx[key]}) of FOV "
                          f"{row['fov_id']} is blank (every voxel {channel.flat[0] if channel.size else 'missing'}); "
                          "treated as not carried (NaN)")
            continue
        target[TARGETS.index(name)] = channel
        carried += 1
    if not carried:
        raise ValueError(f"{path}: FOV {row['fov_id']} has no target channel with signal (dna, membrane and "
                         f"{row['structure']} are all blank)")
    return bf, target


# ---------------------------------------------------------------------------------------------
# One FOV, and the loader over a package
# ---------------------------------------------------------------------------------------------
@dataclass
class FOV:
    """One field of view. ``bf`` ``[1, Z, Y, X]``, ``target`` ``[6, Z, Y, X]`` (NaN = not carried),
    ``truth`` the simulator's clean ``[6, Z, Y, X]`` (None for real data), ``focus_z`` the true
    in-focus slice range ``[lo, hi)`` (None for real data), ``pixel_size`` ``(z, y, x)`` µm,
    ``labels`` the simulator's true instances, uint16 ``[2, Z, Y, X]`` in
    :data:`~vstain.channels.LABEL_CHANNELS` order (None for real data)."""

    fov_id: str
    gene: str
    structure: str
    bf: np.ndarray
    target: np.ndarray
    pixel_size: tuple[float, float, float]
    truth: np.ndarray | None = None
    focus_z: tuple[int, int] | None = None
    fov_path: str = ""
    cells: int = 1
    labels: np.ndarray | None = None


def _has(row, col: str) -> bool:
    return col in row.index and not pd.isna(row[col]) and str(row[col]) != ""


def fetch_fov(pkg, row, cache_dir: str | os.PathLike, dtypes: Sequence[str] | None = ALLEN_DTYPES) -> FOV:
    """Fetch and assemble the FOV of one :func:`fov_table` row (with the simulator's extras
    ``truth_path``, ``truth_labels_path``, ``focus_z_lo``, ``focus_z_hi`` where the row has them);
    ``dtypes`` as in :func:`assemble`."""
    path = fetch(pkg, row["fov_path"], cache_dir)
    vol, pixel_size, _ = read_ome(path)
    bf, target = assemble(vol, row, path, dtypes)
    if pixel_size is None:
        warnings.warn(f"{path}: no physical pixel sizes in the OME metadata; assuming the Allen "
                      f"{ALLEN_PIXEL_SIZE_ZYX} µm (z, y, x)")
        pixel_size = ALLEN_PIXEL_SIZE_ZYX
    truth = focus = labels = None
    if _has(row, "truth_path"):
        tpath = fetch(pkg, row["truth_path"], cache_dir)
        truth = read_ome(tpath)[0].astype(np.float32)
        if truth.shape != target.shape:
            raise ValueError(f"{tpath}: truth of shape {truth.shape} does not match the FOV's target {target.shape}")
    if _has(row, "truth_labels_path"):
        lpath = fetch(pkg, row["truth_labels_path"], cache_dir)
        labels = read_ome(lpath)[0]
        if labels.dtype != np.uint16 or labels.shape != (len(LABEL_CHANNELS), *target.shape[1:]):
            raise ValueError(f"{lpath}: true labels must be uint16 {[len(LABEL_CHANNELS), *target.shape[1:]]} "
                             f"({list(LABEL_CHANNELS)}), got {labels.dtype} {list(labels.shape)}")
    if _has(row, "focus_z_lo") and _has(row, "focus_z_hi"):
        focus = (int(row["focus_z_lo"]), int(row["focus_z_hi"]))
    return FOV(row["fov_id"], row["gene"], row["structure"], bf, target, pixel_size, truth, focus,
               row["fov_path"], int(row.get("cells", 1)), labels)


def load_fovs(registry: str | os.PathLike = ALLEN_REGISTRY, package: str = ALLEN_PACKAGE, n_per_structure: int = 3,
              structures: Sequence[str] = DEFAULT_STRUCTURES, gene_map: dict[str, str] = DEFAULT_GENE_MAP,
              seed: int = 0, cache_dir: str | os.PathLike = "cache", timeout: float = 5.0,
              dtypes: Sequence[str] | None = ALLEN_DTYPES) -> Iterator[FOV]:
    """The Allen-layout loader (thesis 2.1): the FOVs of a quilt3 package, one at a time.

    Args:
        registry: ``s3://allencell`` (the real dataset, needs network) or a local registry.
        package: the package name.
        n_per_structure: FOVs drawn per gene of ``structures`` (seeded).
        structures: ``structure_name`` values (genes) to load; each must be a key of ``gene_map``.
        gene_map: gene -> target channel (a :data:`TARGETS` key).
        seed: seed of the FOV draw.
        cache_dir: where remote files are downloaded (a local registry is read in place).
        timeout: seconds to wait for an S3 endpoint.
        dtypes: allowed image dtypes (default uint16, the Allen data; None: any), see :func:`assemble`.
    """
    check_structures(structures, gene_map, n_per_structure)
    pkg = open_package(registry, package, timeout)
    fovs = fov_table(read_metadata(pkg, cache_dir), gene_map, source=f"{registry_uri(registry)} {package}/metadata.csv")
    for _, row in select_fovs(fovs, n_per_structure, structures, gene_map, seed).iterrows():
        yield fetch_fov(pkg, row, cache_dir, dtypes)
