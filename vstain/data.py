"""The Allen Cell hiPSC single-cell image dataset layout (Viana et al., Nature 2023; thesis 2.1).

One FOV becomes a brightfield stack ``[1, Z, Y, X]`` and a six-channel target ``[6, Z, Y, X]`` that
holds NaN in the channels the FOV does not carry (each FOV is one cell line: one FP-tagged
structure plus the DNA and membrane dyes).
"""
from __future__ import annotations

# The six target channels of the thesis, in the generator's output order.
TARGETS: tuple[str, ...] = ("dna", "membrane", "mito", "envelope", "actomyosin", "nucleoli")
TARGET_LABELS: dict[str, str] = {
    "dna": "DNA",
    "membrane": "Cell membrane",
    "mito": "Mitochondria",
    "envelope": "Nuclear envelope",
    "actomyosin": "Actomyosin bundles",  # the thesis' "myofibrils"
    "nucleoli": "Nucleoli",
}
# Gene (metadata column `structure_name`) -> target channel of the FP-tagged structure.
DEFAULT_GENE_MAP: dict[str, str] = {
    "TOMM20": "mito",
    "LMNB1": "envelope",
    "MYH10": "actomyosin",
    "FBL": "nucleoli",
    "NPM1": "nucleoli",  # alternative nucleolar marker
}
# The package and registry of the real dataset.
ALLEN_PACKAGE = "aics/hipsc_single_cell_image_dataset"
ALLEN_REGISTRY = "s3://allencell"
# Physical pixel sizes of the real 100x FOVs, micrometres.
ALLEN_PIXEL_SIZE_ZYX = (0.29, 0.108, 0.108)
# Metadata columns: 0-based channel indices into each FOV's OME-TIFF.
CHANNEL_COLUMNS = {
    "brightfield": "ChannelNumberBrightfield",
    "struct": "ChannelNumberStruct",
    "dna": "ChannelNumber405",
    "membrane": "ChannelNumber638",
}

# The FP-tagged structures of the thesis, one gene each (NPM1 may replace FBL through `structures`).
DEFAULT_STRUCTURES: tuple[str, ...] = ("TOMM20", "LMNB1", "MYH10", "FBL")

import logging  # noqa: E402  (imports below the constants block the lead keeps at the top)
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator, Sequence  # noqa: E402
from urllib.parse import urlparse  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tifffile  # noqa: E402

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
    pkg.build(package, registry=reg.as_uri(), message="vstain.data.publish_local")
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
                "publish one with vstain.data.publish_local or vstain.simulate.write_registry"
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


# ---------------------------------------------------------------------------------------------
# OME-TIFF -> [C, Z, Y, X] and physical pixel sizes
# ---------------------------------------------------------------------------------------------
_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "m": 1e6}


class _LogCatcher(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _pixel_sizes(tif: tifffile.TiffFile, path) -> tuple[float, float, float] | None:
    if not tif.is_ome:
        return None
    pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
    pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
    out = []
    for ax in "ZYX":
        v = pixels.get(f"PhysicalSize{ax}")
        if v is None:
            return None
        unit = pixels.get(f"PhysicalSize{ax}Unit", "µm")
        if unit not in _UNIT_TO_UM:
            raise ValueError(f"{path}: unknown PhysicalSize{ax}Unit {unit!r} in the OME metadata")
        out.append(float(v) * _UNIT_TO_UM[unit])
    return tuple(out)


def read_ome(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float] | None, list[str]]:
    """An OME-TIFF stack as ``[C, Z, Y, X]`` (native dtype), its pixel size ``(z, y, x)`` in µm
    from the OME metadata (None if absent) and its channel names.

    Raises ValueError naming the file for a corrupt or truncated TIFF and for an image that is
    not a (multi-channel) ZYX stack: 2D, or with further axes (time, RGB samples) of size > 1.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    size = path.stat().st_size
    log = logging.getLogger("tifffile")
    catcher = _LogCatcher()
    log.addHandler(catcher)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape = series.axes, series.shape
            for page in tif.pages:
                if any(o + n > size for o, n in zip(page.dataoffsets, page.databytecounts)):
                    raise ValueError("image data run past the end of the file")
            data = series.asarray()
            pixel_size = _pixel_sizes(tif, path)
            names = []
            if tif.is_ome:
                img = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
                ch = (img[0] if isinstance(img, list) else img)["Pixels"].get("Channel", [])
                names = [c.get("Name", "") for c in (ch if isinstance(ch, list) else [ch])]
    except (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError, EOFError) as e:
        raise ValueError(f"{path}: not a readable TIFF, the file is truncated or corrupt ({e}); "
                         "delete it (from the cache) to download it again") from e
    finally:
        log.removeHandler(catcher)
    broken = [m for m in catcher.messages if any(w in m.lower() for w in ("invalid", "corrupt", "truncat"))]
    if broken:
        raise ValueError(f"{path}: the TIFF is truncated or corrupt ({broken[0]}); "
                         "delete it (from the cache) to download it again")
    extra = {a: n for a, n in zip(axes, shape) if a not in "CZYX" and n > 1}
    if not {"Y", "X"} <= set(axes) or "Z" not in axes:
        raise ValueError(f"{path}: a {len(shape)}D image with axes {axes!r} and shape {shape}, "
                         "where a [C,] Z, Y, X stack is expected (no Z axis)")
    if extra:
        raise ValueError(f"{path}: a {len(shape)}D image with axes {axes!r} and shape {shape}, where a "
                         f"[C,] Z, Y, X stack is expected (extra axes {extra})")
    data = data.reshape([n for a, n in zip(axes, shape) if a in "CZYX"])
    kept = "".join(a for a in axes if a in "CZYX")
    if "C" not in kept:
        data, kept = data[None], "C" + kept
    data = np.transpose(data, [kept.index(a) for a in "CZYX"])
    return data, pixel_size, names


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


def assemble(vol: np.ndarray, row, path="") -> tuple[np.ndarray, np.ndarray]:
    """Brightfield ``[1, Z, Y, X]`` and six-channel target ``[6, Z, Y, X]`` (float32, NaN in the
    three channels the FOV does not carry) from a ``[C, Z, Y, X]`` stack and its metadata row."""
    c = vol.shape[0]
    idx = {k: _channel(row, k, c, path) for k in CHANNEL_COLUMNS}
    bf = vol[idx["brightfield"]][None].astype(np.float32)
    target = np.full((len(TARGETS), *vol.shape[1:]), np.nan, np.float32)
    target[TARGETS.index("dna")] = vol[idx["dna"]]
    target[TARGETS.index("membrane")] = vol[idx["membrane"]]
    target[TARGETS.index(row["structure"])] = vol[idx["struct"]]
    return bf, target


# ---------------------------------------------------------------------------------------------
# One FOV, and the loader over a package
# ---------------------------------------------------------------------------------------------
@dataclass
class FOV:
    """One field of view. ``bf`` ``[1, Z, Y, X]``, ``target`` ``[6, Z, Y, X]`` (NaN = not carried),
    ``truth`` the simulator's clean ``[6, Z, Y, X]`` (None for real data), ``focus_z`` the true
    in-focus slice range ``[lo, hi)`` (None for real data), ``pixel_size`` ``(z, y, x)`` µm."""

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


def _has(row, col: str) -> bool:
    return col in row.index and not pd.isna(row[col]) and str(row[col]) != ""


def load_fov(pkg, row, cache_dir: str | os.PathLike) -> FOV:
    """Fetch and assemble the FOV of one :func:`fov_table` row (with the simulator's extras
    ``truth_path``, ``focus_z_lo``, ``focus_z_hi`` where the row has them)."""
    path = fetch(pkg, row["fov_path"], cache_dir)
    vol, pixel_size, _ = read_ome(path)
    bf, target = assemble(vol, row, path)
    if pixel_size is None:
        warnings.warn(f"{path}: no physical pixel sizes in the OME metadata; assuming the Allen "
                      f"{ALLEN_PIXEL_SIZE_ZYX} µm (z, y, x)")
        pixel_size = ALLEN_PIXEL_SIZE_ZYX
    truth = focus = None
    if _has(row, "truth_path"):
        tpath = fetch(pkg, row["truth_path"], cache_dir)
        truth = read_ome(tpath)[0].astype(np.float32)
        if truth.shape != target.shape:
            raise ValueError(f"{tpath}: truth of shape {truth.shape} does not match the FOV's target {target.shape}")
    if _has(row, "focus_z_lo") and _has(row, "focus_z_hi"):
        focus = (int(row["focus_z_lo"]), int(row["focus_z_hi"]))
    return FOV(row["fov_id"], row["gene"], row["structure"], bf, target, pixel_size, truth, focus,
               row["fov_path"], int(row.get("cells", 1)))


def load_fovs(registry: str | os.PathLike = ALLEN_REGISTRY, package: str = ALLEN_PACKAGE, n_per_structure: int = 3,
              structures: Sequence[str] = DEFAULT_STRUCTURES, gene_map: dict[str, str] = DEFAULT_GENE_MAP,
              seed: int = 0, cache_dir: str | os.PathLike = "cache", timeout: float = 5.0) -> Iterator[FOV]:
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
    """
    check_structures(structures, gene_map, n_per_structure)
    pkg = open_package(registry, package, timeout)
    fovs = fov_table(read_metadata(pkg, cache_dir), gene_map, source=f"{registry_uri(registry)} {package}/metadata.csv")
    for _, row in select_fovs(fovs, n_per_structure, structures, gene_map, seed).iterrows():
        yield load_fov(pkg, row, cache_dir)


# ---------------------------------------------------------------------------------------------
# Stage 01_data: FOVs -> fovs.csv + fovs/<id>.tif [7,Z,Y,X] + truth/<id>.tif [6,Z,Y,X]
# ---------------------------------------------------------------------------------------------
SOURCES = ("synthetic", "allen")
FOVS_CSV = "fovs.csv"


def center_crop_yx(fov: FOV, crop_yx: Sequence[int]) -> FOV:
    """The central ``(Y, X)`` voxels of a FOV (all slices, all channels, the truth too)."""
    ny, nx = fov.bf.shape[-2:]
    cy, cx = (int(c) for c in crop_yx)
    if not (0 < cy <= ny and 0 < cx <= nx):
        raise ValueError(f"crop_yx {tuple(crop_yx)} does not fit FOV {fov.fov_id} of {ny} x {nx} (Y, X) voxels")
    sl = (Ellipsis, slice((ny - cy) // 2, (ny - cy) // 2 + cy), slice((nx - cx) // 2, (nx - cx) // 2 + cx))
    return replace(fov, bf=fov.bf[sl], target=fov.target[sl], truth=None if fov.truth is None else fov.truth[sl])


def run_data_stage(out_dir: str | os.PathLike, source: str = "synthetic", registry: str | None = None,
                   package: str = ALLEN_PACKAGE, n_per_structure: int = 3, shape: Sequence[int] | None = None,
                   pixel_size: Sequence[float] | None = None, seed: int = 0,
                   structures: Sequence[str] = DEFAULT_STRUCTURES, gene_map: dict[str, str] = DEFAULT_GENE_MAP,
                   crop_yx: Sequence[int] | None = None, timeout: float = 5.0) -> pd.DataFrame:
    """Stage ``01_data``: load FOVs in the Allen layout and write them for the next stages.

    Args:
        out_dir: the stage folder (``rundir.stage_dir(run_dir, "01_data")``).
        source: ``"synthetic"``: simulate ``n_per_structure`` FOVs per structure into a local
            registry ``out_dir/registry`` (shape, pixel size, seed) and load them through the same
            loader; ``"allen"``: the real dataset (needs network).
        registry: the registry to read for ``"allen"`` (default ``s3://allencell``; a local
            registry works too); must be None for ``"synthetic"``.
        package, n_per_structure, structures, gene_map, seed, timeout: see :func:`load_fovs`.
        crop_yx: keep only the central ``(Y, X)`` voxels of every FOV (None = the whole FOV); a real
            FOV of about 70 x 624 x 924 voxels is 1.1 GB as a float32 ``[7, Z, Y, X]`` volume.
        shape: simulated FOV shape ``(Z, Y, X)`` (synthetic only; None = ``SimConfig``'s).
        pixel_size: simulated voxel size ``(z, y, x)`` µm (synthetic only; None = ``SimConfig``'s,
            coarser than the real 0.29/0.108 µm so a small FOV holds a colony, not one cell).

    Returns:
        The table written to ``fovs.csv``: ``fov_id, gene, structure, path, truth_path,
        focus_z_lo, focus_z_hi, pixel_size_z, pixel_size_y, pixel_size_x, fov_path, cells``
        (paths relative to ``out_dir``).
    """
    from .dataset import write_volume

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    check_structures(structures, gene_map, n_per_structure)
    out = Path(out_dir)
    for sub in ("fovs", "truth"):
        shutil.rmtree(out / sub, ignore_errors=True)
    if source == "synthetic":
        if registry is not None:
            raise ValueError("registry must be None for source 'synthetic' (the simulator writes its own)")
        from .simulate import SimConfig, write_registry

        targets = [gene_map[g] for g in structures]
        if len(set(targets)) < len(targets):
            raise ValueError(f"structures {list(structures)}: the simulator makes one cell line per tagged structure, "
                             f"but these genes share one ({dict(zip(structures, targets))})")
        shutil.rmtree(out / "registry", ignore_errors=True)
        geometry = {k: tuple(v) for k, v in (("shape", shape), ("pixel_size", pixel_size)) if v is not None}
        registry = write_registry(out / "registry", n_per_structure, SimConfig(**geometry), seed,
                                  structures=targets, gene_map={g: gene_map[g] for g in structures})
    elif registry is None:
        registry = ALLEN_REGISTRY
    rows = []
    for f in load_fovs(registry, package, n_per_structure, structures, gene_map, seed, out / "cache", timeout):
        if crop_yx is not None:
            f = center_crop_yx(f, crop_yx)
        rel = f"fovs/{f.fov_id}.tif"
        write_volume(out / rel, np.concatenate([f.bf, f.target]), ["brightfield", *TARGETS])
        trel = ""
        if f.truth is not None:
            trel = f"truth/{f.fov_id}.tif"
            write_volume(out / trel, f.truth, list(TARGETS))
        lo, hi = f.focus_z if f.focus_z else (None, None)
        rows.append({"fov_id": f.fov_id, "gene": f.gene, "structure": f.structure, "path": rel, "truth_path": trel,
                     "focus_z_lo": lo, "focus_z_hi": hi, "pixel_size_z": f.pixel_size[0],
                     "pixel_size_y": f.pixel_size[1], "pixel_size_x": f.pixel_size[2],
                     "fov_path": f.fov_path, "cells": f.cells})
    df = pd.DataFrame(rows).astype({"focus_z_lo": "Int64", "focus_z_hi": "Int64"})
    df.to_csv(out / FOVS_CSV, index=False)
    return df


def read_fovs(stage: str | os.PathLike) -> pd.DataFrame:
    """The ``01_data`` table with ``path``/``truth_path`` made absolute ("" where no truth)."""
    stage = Path(stage)
    f = stage / FOVS_CSV
    if not f.exists():
        raise FileNotFoundError(f"no {FOVS_CSV} at {stage}: run notebooks/01_data.ipynb first")
    df = pd.read_csv(f, dtype={"fov_id": str, "truth_path": str}, keep_default_na=True)
    df["truth_path"] = df["truth_path"].fillna("")
    df["path"] = [str(stage / p) for p in df["path"]]
    df["truth_path"] = [str(stage / p) if p else "" for p in df["truth_path"]]
    for c in ("focus_z_lo", "focus_z_hi"):
        df[c] = df[c].astype("Int64")
    return df


def read_stage_fov(row) -> FOV:
    """One written FOV of :func:`read_fovs` (a row with absolute paths) as a :class:`FOV`."""
    from .dataset import read_volume

    vol = read_volume(row["path"])
    truth = read_volume(row["truth_path"]) if row["truth_path"] else None
    focus = None
    if not (pd.isna(row["focus_z_lo"]) or pd.isna(row["focus_z_hi"])):
        focus = (int(row["focus_z_lo"]), int(row["focus_z_hi"]))
    pixel_size = (float(row["pixel_size_z"]), float(row["pixel_size_y"]), float(row["pixel_size_x"]))
    return FOV(str(row["fov_id"]), row["gene"], row["structure"], vol[:1], vol[1:], pixel_size, truth, focus,
               row.get("fov_path", ""), int(row.get("cells", 1)))


def stage_summary(fovs: pd.DataFrame, voxels_per_fov: int = 4000, seed: int = 0):
    """What notebook 01_data plots, reading each written FOV once: a random sample of voxel values
    ``{channel: {structure: values}}`` (brightfield, then TARGETS; only FOVs that carry the
    channel) and the bool ``[n_fovs, 6]`` matrix of carried target channels.

    Args:
        fovs: :func:`read_fovs` (absolute paths).
        voxels_per_fov: voxels sampled per FOV and channel.
    """
    rng = np.random.default_rng(seed)
    samples: dict[str, dict[str, list]] = {c: {} for c in ("brightfield", *TARGETS)}
    carried = np.zeros((len(fovs), len(TARGETS)), bool)
    for i, (_, row) in enumerate(fovs.iterrows()):
        fov = read_stage_fov(row)
        bf, target = fov.bf, fov.target
        vol = np.concatenate([bf, target]).reshape(1 + len(TARGETS), -1)
        pick = rng.integers(0, vol.shape[1], size=min(voxels_per_fov, vol.shape[1]))
        for c, name in enumerate(samples):
            if not np.isnan(vol[c]).all():
                samples[name].setdefault(row["gene"], []).append(vol[c, pick])
        carried[i] = ~np.isnan(target).all(axis=(1, 2, 3))
    return {c: {s: np.concatenate(v) for s, v in per.items()} for c, per in samples.items()}, carried
