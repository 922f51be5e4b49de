"""A browsable 3D view of one FOV for the static book: a z-slider and a channel menu over the XY
sections of the brightfield, the truth, the measured target and each model's prediction, with an
XZ section of each below at the true voxel aspect.

The viewer is one self-contained HTML string (inline CSS and JavaScript, every section a base64
JPEG in a data URI): it needs no server, no kernel, no ipywidgets and nothing from a CDN, so it
works in the built book offline and in JupyterLab. Notebook 07 shows it for the first test FOVs;
:func:`vstain.book.browser.check_viewers` moves its slider in headless Chromium.

Colours follow :mod:`vstain.plots.views`: one display range per channel and FOV for all panels
(:func:`~vstain.plots.views.channel_ranges`), magma for the channels, grey for the brightfield.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import math
from typing import Mapping, Sequence

import matplotlib
import numpy as np
from PIL import Image
from skimage.transform import downscale_local_mean

from vstain.channels import TARGET_LABELS, TARGETS

from .views import PERCENTILES, RANGE_RULE, aspect, channel_ranges, robust_range

MAX_WIDTH = 128  # px: XY sections wider than this are block-averaged down (keeps the page small)
QUALITY = 70  # JPEG quality of every section
DISPLAY_WIDTH = 128  # CSS px of one panel on the page (the panels wrap to the page width)
_MAGMA = (matplotlib.colormaps["magma"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
_COUNTER = itertools.count()  # makes ids unique when identical viewers share a page

_STYLE = """<style>
.vstain-viewer {font: 13px sans-serif; margin: 0.5em 0 1.5em 0;}
.vstain-viewer .vv-controls {margin: 0.3em 0; display: flex; gap: 1.5em; align-items: center; flex-wrap: wrap;}
.vstain-viewer .vv-grid {display: flex; gap: 6px; flex-wrap: wrap;}
.vstain-viewer .vv-panel {flex: none; text-align: center;}
.vstain-viewer .vv-box {position: relative; background: #333; color: #aaa; margin-bottom: 4px;}
.vstain-viewer .vv-box img {display: block; width: 100%; height: 100%; image-rendering: pixelated;}
.vstain-viewer .vv-nolabel {position: absolute; inset: 0; display: flex; align-items: center; justify-content: center;}
.vstain-viewer .vv-line {position: absolute; left: 0; right: 0; height: 0; pointer-events: none;}
.vstain-viewer .vv-zline {border-top: 1px solid #3cf;}
.vstain-viewer .vv-yline {border-top: 1px dashed rgba(255, 255, 255, 0.6);}
.vstain-viewer .vv-note {color: #666; font-size: 11px;}
</style>"""

# Filled per viewer from DATA (a JSON object, see volume_viewer) and ID; everything it touches is
# under the root element, so several viewers on a page stay independent.
_SCRIPT = """<script>
(function () {
  const D = DATA, root = document.getElementById("ID");
  const slider = root.querySelector(".vv-z"), menu = root.querySelector(".vv-channel");
  function show(img, note, src) {
    img.style.visibility = src ? "visible" : "hidden";
    if (src) { img.src = src; }
    if (note) { note.style.display = src ? "none" : "flex"; }
  }
  function update() {
    const z = Number(slider.value), c = Number(menu.value);
    root.querySelectorAll(".vv-panel").forEach(function (el, p) {
      const xy = p === 0 ? D.bf[z] : (D.panels[p - 1].xy[c] || [])[z];
      const xz = p === 0 ? D.bf_xz : D.panels[p - 1].xz[c];
      show(el.querySelector(".vv-xy img"), el.querySelector(".vv-xy .vv-nolabel"), xy);
      show(el.querySelector(".vv-xz img"), el.querySelector(".vv-xz .vv-nolabel"), xz);
      el.querySelector(".vv-zline").style.top = (100 * (z + 0.5) / D.depth) + "%";
    });
    root.querySelector(".vv-zlabel").textContent =
      "z = " + z + " of " + (D.depth - 1) + " (" + (z * D.dz).toFixed(2) + " \\u00b5m)";
    root.querySelector(".vv-range").textContent = D.ranges[c];
  }
  slider.addEventListener("input", update);
  menu.addEventListener("change", update);
  update();
})();
</script>"""


def _block_mean(vol: np.ndarray, factor: int) -> np.ndarray:
    """``[Z, Y, X]`` block-averaged by ``factor`` in Y and X (edges that do not fill a block are cut)."""
    if factor == 1:
        return vol
    z, y, x = vol.shape
    return downscale_local_mean(vol[:, : y - y % factor, : x - x % factor], (1, factor, factor))


def _uint8(img: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    lo, hi = vrange
    return (np.clip((np.nan_to_num(img, nan=lo) - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int) -> str:
    """A uint8 ``[H, W]`` (grey) or ``[H, W, 3]`` image as a ``data:image/jpeg;base64`` URI."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _sections(vol: np.ndarray, vrange: tuple[float, float], y: int, quality: int, colour: bool
              ) -> tuple[list[str], str]:
    """The data URIs of every XY section of ``[Z, Y, X]`` and of its XZ section at row ``y``."""
    def paint(section: np.ndarray) -> np.ndarray:
        grey = _uint8(section, vrange)
        return _MAGMA[grey] if colour else grey

    return [_jpeg(paint(s), quality) for s in vol], _jpeg(paint(vol[:, y, :]), quality)


def _check(bf: np.ndarray, panels: Mapping[str, np.ndarray | None], n_channels: int) -> np.ndarray:
    """``bf`` as ``[Z, Y, X]``; raises ValueError naming the volume whose shape does not fit."""
    bf = np.asarray(bf)
    if bf.ndim == 4 and bf.shape[0] == 1:
        bf = bf[0]
    if bf.ndim != 3:
        raise ValueError(f"volume_viewer: bf must be [Z, Y, X] or [1, Z, Y, X], got shape {bf.shape}")
    for name, vol in panels.items():
        if vol is not None and tuple(np.shape(vol)) != (n_channels, *bf.shape):
            raise ValueError(f"volume_viewer: panel {name!r} has shape {tuple(np.shape(vol))}, expected "
                             f"{(n_channels, *bf.shape)} ([C, Z, Y, X] of {n_channels} channels like bf)")
    if not any(vol is not None for vol in panels.values()):
        raise ValueError("volume_viewer: no panel to show (every panel is None)")
    return bf


def _panel_html(name: str, xy_size: tuple[int, int], xz_height: int, y_line: float) -> str:
    """One column: the name, the XY box (a dashed line at the XZ row) and the XZ box (a line at z)."""
    w, h = xy_size
    return (f'<div class="vv-panel" style="width:{w}px"><div>{html.escape(name)}</div>'
            f'<div class="vv-box vv-xy" style="width:{w}px;height:{h}px"><img alt="{html.escape(name)} XY">'
            f'<div class="vv-nolabel">no label</div>'
            f'<div class="vv-line vv-yline" style="top:{y_line:.2f}%"></div></div>'
            f'<div class="vv-box vv-xz" style="width:{w}px;height:{xz_height}px"><img alt="{html.escape(name)} XZ">'
            f'<div class="vv-nolabel">no label</div><div class="vv-line vv-zline"></div></div></div>')


def volume_viewer(bf: np.ndarray, panels: Mapping[str, np.ndarray | None], voxel_size_zyx: Sequence[float],
                  channel_names: Sequence[str] | None = None, title: str = "", *, truth: str = "truth",
                  target: str = "target", max_width: int = MAX_WIDTH, quality: int = QUALITY) -> str:
    """An HTML viewer of one FOV: a z-slider and a channel menu over XY sections, an XZ section of
    each panel below it at the true voxel aspect (a line marks the current z, a dashed line on the
    XY sections marks the XZ row, the central one).

    Each channel has one display range for all its panels: :func:`~vstain.plots.views.channel_ranges`
    with the panel named ``truth`` as the truth, the one named ``target`` as the measured target and
    the others as predictions. A channel that is all NaN in a panel (no label) shows "no label".

    Args:
        bf: the brightfield, ``[Z, Y, X]`` or ``[1, Z, Y, X]``, drawn grey on its own robust range.
        panels: name -> ``[C, Z, Y, X]`` (z-scored), in display order; a None panel (no truth on real
            data) is left out.
        voxel_size_zyx: µm (:func:`~vstain.plots.views.voxel_size`); sets the XY and XZ aspect.
        channel_names: C labels for the menu (default: the six :data:`~vstain.channels.TARGETS` labels).
        title: a line above the viewer.
        truth, target: the names in ``panels`` that set the display range (default "truth", "target").
        max_width: XY sections wider than this many pixels are block-averaged down by an integer factor.
        quality: JPEG quality (1-95) of every section.

    Returns:
        The HTML (wrap it in ``IPython.display.HTML`` to show it in a notebook).
    """
    names = list(channel_names or [TARGET_LABELS[t] for t in TARGETS])
    if max_width < 1 or not 1 <= quality <= 95:
        raise ValueError(f"volume_viewer: max_width must be >= 1 and quality in 1..95, got {max_width}, {quality}")
    aspect(voxel_size_zyx, "xz")  # raises on a voxel size that is not three positive values
    bf = _check(bf, panels, len(names))
    shown = {k: np.asarray(v, dtype=np.float32) for k, v in panels.items() if v is not None}
    preds = [v for k, v in shown.items() if k not in (truth, target)]
    ranges = channel_ranges(shown.get(truth), shown.get(target), preds)
    factor = math.ceil(bf.shape[2] / max_width)
    small_bf = _block_mean(bf.astype(np.float32), factor)
    depth, y_px, x_px = small_bf.shape
    y_row = y_px // 2
    bf_xy, bf_xz = _sections(small_bf, robust_range(bf, PERCENTILES), y_row, quality, colour=False)
    data = {"depth": depth, "dz": float(voxel_size_zyx[0]), "bf": bf_xy, "bf_xz": bf_xz, "panels": [],
            "ranges": [f"display range {lo:.2f} to {hi:.2f} (z-scored intensity)" for lo, hi in ranges]}
    for name, vol in shown.items():
        xy, xz = [], []
        for c in range(len(names)):
            if np.isnan(vol[c]).all():
                xy.append(None), xz.append(None)
                continue
            s_xy, s_xz = _sections(_block_mean(vol[c], factor), ranges[c], y_row, quality, colour=True)
            xy.append(s_xy), xz.append(s_xz)
        data["panels"].append({"name": name, "xy": xy, "xz": xz})
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # no "</script>" inside the script
    uid = "vv-" + hashlib.sha1(f"{next(_COUNTER)}{title}{payload}".encode()).hexdigest()[:12]
    width = DISPLAY_WIDTH
    xy_h = round(width * y_px / x_px * aspect(voxel_size_zyx, "xy"))
    xz_h = max(1, round(width * depth / (x_px * factor) * aspect(voxel_size_zyx, "xz")))  # drawn voxels: factor x wide
    columns = [_panel_html(n, (width, xy_h), xz_h, 100 * (y_row + 0.5) / y_px) for n in ("brightfield", *shown)]
    options = "".join(f'<option value="{c}">{html.escape(n)}</option>' for c, n in enumerate(names))
    vz, vy, vx = (float(v) for v in voxel_size_zyx)
    note = (f"XY sections at the slider's z; below, the XZ section through the dashed row (y = {y_row * factor} of {bf.shape[1]}). "
            f"Voxel {vz:g} x {vy * factor:g} x {vx * factor:g} µm (z, y, x) as drawn. {RANGE_RULE}.")
    return (f'<div class="vstain-viewer" id="{uid}">{_STYLE}'
            f'<div><b>{html.escape(title)}</b></div>'
            f'<div class="vv-controls"><label>z <input class="vv-z" type="range" min="0" max="{depth - 1}" '
            f'value="{depth // 2}"></label><span class="vv-zlabel"></span>'
            f'<label>channel <select class="vv-channel">{options}</select></label>'
            f'<span class="vv-range vv-note"></span></div>'
            f'<div class="vv-grid">{"".join(columns)}</div><div class="vv-note">{html.escape(note)}</div>'
            + _SCRIPT.replace('"ID"', json.dumps(uid)).replace("DATA", payload) + "</div>")
