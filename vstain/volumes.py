"""Volumes on disk: OME-TIFF stacks read as ``[C, Z, Y, X]`` with their pixel sizes and channel
names, float32 volumes (and uint16 instance labels) written between stages, the file columns of a
stage's table, and file hashes.

Every stage reads and writes its images through this module (the Allen loader, the simulator, the
processed set, the model stages, the prediction command); it imports nothing of the project.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import tifffile

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


def write_ome(path: str | os.PathLike, vol: np.ndarray, names: Sequence[str], pixel_size: Sequence[float]) -> None:
    """``vol [C, Z, Y, X]`` as an OME-TIFF with channel names and physical pixel sizes (µm)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"axes": "CZYX", "PhysicalSizeZ": pixel_size[0], "PhysicalSizeY": pixel_size[1],
            "PhysicalSizeX": pixel_size[2], "PhysicalSizeZUnit": "µm", "PhysicalSizeYUnit": "µm",
            "PhysicalSizeXUnit": "µm", "Channel": {"Name": list(names)}}
    tifffile.imwrite(path, vol, ome=True, metadata=meta)


def write_volume(path: str | Path, vol: np.ndarray, channel_names: list[str] | None = None) -> None:
    """A float32 ``[C, Z, Y, X]`` volume as an OME-TIFF."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"axes": "CZYX"}
    if channel_names:
        meta["Channel"] = {"Name": list(channel_names)}
    tifffile.imwrite(path, np.ascontiguousarray(vol, dtype=np.float32), ome=True, metadata=meta)


def write_labels(path: str | Path, labels: np.ndarray, channel_names: Sequence[str]) -> None:
    """Instance labels ``[C, Z, Y, X]`` (0 = background) as a uint16 OME-TIFF; labels that do not
    fit uint16 (negative, above 65535 or not integers) are an error, never wrapped or rounded."""
    labels = np.asarray(labels)
    if labels.ndim != 4 or labels.shape[0] != len(channel_names):
        raise ValueError(f"{path}: labels must be [{len(channel_names)}, Z, Y, X] ({list(channel_names)}), "
                         f"got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and (labels.min() < 0 or labels.max() > 65535)):
        raise ValueError(f"{path}: labels must be integers in [0, 65535] (uint16), got dtype {labels.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.ascontiguousarray(labels, dtype=np.uint16), ome=True,
                     metadata={"axes": "CZYX", "Channel": {"Name": list(channel_names)}})


def read_labels(path: str | Path) -> np.ndarray:
    """The uint16 ``[C, Z, Y, X]`` instance labels written by :func:`write_labels` (or the simulator)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label file {path} does not exist")
    labels = tifffile.imread(path)
    if labels.dtype != np.uint16 or labels.ndim != 4:
        raise ValueError(f"{path}: expected uint16 [C, Z, Y, X] instance labels, got {labels.dtype} {labels.shape}")
    return labels


def read_volume(path: str | Path) -> np.ndarray:
    """A ``[C, Z, Y, X]`` float32 volume written by :func:`write_volume` (a one-channel volume,
    which tifffile reads as ``[Z, Y, X]``, gets its ``C`` axis back)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"volume file {path} does not exist")
    vol = tifffile.imread(path).astype(np.float32, copy=False)
    if vol.ndim == 3:
        vol = vol[None]
    if vol.ndim != 4:
        raise ValueError(f"{path}: expected a [C, Z, Y, X] volume, got shape {vol.shape}")
    return vol


def resolve_paths(df: pd.DataFrame, stage: str | os.PathLike, columns: Sequence[str]) -> pd.DataFrame:
    """A stage table's file columns (paths relative to ``stage``) made absolute, in place.

    A FOV without such a file (an empty or missing cell, e.g. no clean truth or no true labels on
    real data) gets ``""``, and so does every row when the table lacks the column (a run written
    before the column existed). Returns ``df``.
    """
    for col in columns:
        rel = df[col].fillna("") if col in df else pd.Series("", index=df.index)
        df[col] = [str(Path(stage) / p) if isinstance(p, str) and p else "" for p in rel]
    return df


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (stage manifests, resumable runs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def made_from(marker: str | os.PathLike, source_sha: str) -> bool:
    """Whether files derived from a source were made from this very source: ``marker`` holds the
    source's SHA-256 (:func:`mark_source` wrote it when they were made)."""
    marker = Path(marker)
    return marker.exists() and marker.read_text().strip() == source_sha


def mark_source(marker: str | os.PathLike, source_sha: str) -> None:
    """Record the SHA-256 of the source that derived files were just made from (see :func:`made_from`)."""
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(source_sha)
