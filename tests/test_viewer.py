"""The 3D viewer of the results page (vstain.plots.viewer): what its HTML holds, and in headless
Chromium that its z-slider and channel menu change the images (vstain.book.browser.check_viewers)."""
from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from test_book import chromium_or_fail

from vstain.book import browser
from vstain.plots import viewer
from vstain.plots.views import channel_ranges

VOXEL = (0.5, 0.3, 0.3)


def _payload(html: str) -> dict:
    return json.loads(re.search(r"const D = (\{.*?\}), root = ", html).group(1))


def _image(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def _fov(shape=(13, 34, 35), channels=3, seed=0):
    """bf [1, Z, Y, X] and smooth truth, target (channel 1 unlabelled) and prediction [C, Z, Y, X]."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    truth = np.stack([np.exp(-((x - 0.3 * c) ** 2 + y**2 + z**2) * 4) * (c + 1) for c in range(channels)])
    truth = truth.astype(np.float32)  # a blob per channel, each in another place
    target = truth + 0.1 * rng.standard_normal(truth.shape).astype(np.float32)
    target[1 % channels] = np.nan
    return (z + x)[None].astype(np.float32), truth, target, 0.5 * truth


def test_html_holds_every_section_at_the_shared_range():
    bf, truth, target, pred = _fov()
    html = viewer.volume_viewer(bf, {"truth": truth, "target": target, "model": pred, "no truth": None}, VOXEL,
                                ["A", "B", "C"], title="FOV 7 <test>")
    data = _payload(html)
    assert 'type="range" min="0" max="12"' in html and html.count("<option") == 3
    assert "FOV 7 &lt;test&gt;" in html and "http" not in html  # escaped title; nothing fetched from elsewhere
    assert [p["name"] for p in data["panels"]] == ["truth", "target", "model"]  # None panels left out
    assert len(data["bf"]) == 13 and data["depth"] == 13
    target_panel = data["panels"][1]
    assert target_panel["xy"][1] is None and target_panel["xz"][1] is None  # the unlabelled channel
    assert all(len(p["xy"][c]) == 13 for p in data["panels"] for c in range(3) if p["xy"][c] is not None)
    assert _image(data["panels"][0]["xy"][0][6]).size == (35, 34)
    assert _image(data["panels"][0]["xz"][2]).size == (35, 13)
    ranges = channel_ranges(truth, target, [pred])
    assert data["ranges"][2] == f"display range {ranges[2][0]:.2f} to {ranges[2][1]:.2f} (z-scored intensity)"
    # the prediction is half the truth: on the truth's range its brightest pixel is darker than the truth's
    peak = [np.asarray(_image(p["xy"][2][6]).convert("L")).max() for p in data["panels"][::2]]
    assert peak[0] > peak[1] + 40


def test_wide_sections_are_averaged_down_and_xz_keeps_the_voxel_aspect():
    bf, truth, target, pred = _fov(shape=(5, 41, 300), channels=2)
    html = viewer.volume_viewer(bf, {"truth": truth, "model": pred}, (1.2, 0.3, 0.3), ["A", "B"], max_width=128)
    data = _payload(html)
    assert _image(data["bf"][0]).size == (100, 13)  # factor 3: 300 -> 100, 41 -> 13 rows (edge cut)
    assert _image(data["panels"][1]["xz"][0]).size == (100, 5)
    # XZ box: W px for 100 drawn voxels of 0.9 µm (90 µm) and 5 slices of 1.2 µm (6 µm) -> W * 6 / 90 high
    w = viewer.DISPLAY_WIDTH
    assert f'class="vv-box vv-xz" style="width:{w}px;height:{round(w * 6 / 90)}px"' in html
    assert f'class="vv-box vv-xy" style="width:{w}px;height:{round(w * 13 / 100)}px"' in html


def test_identical_viewers_get_different_ids():
    bf, truth, target, pred = _fov(channels=1)
    ids = [re.search(r'id="(vv-[0-9a-f]+)"', viewer.volume_viewer(bf, {"m": pred}, VOXEL, ["A"])).group(1)
           for _ in range(2)]
    assert ids[0] != ids[1]


@pytest.mark.parametrize(
    "bf_shape, panel_shape, voxel, match",
    [
        ((2, 13, 34, 35), (3, 13, 34, 35), VOXEL, r"bf must be \[Z, Y, X\]"),
        ((13, 34, 35), (3, 13, 34, 36), VOXEL, "panel 'model' has shape"),
        ((13, 34, 35), (2, 13, 34, 35), VOXEL, "panel 'model' has shape"),
        ((13, 34, 35), (3, 13, 34, 35), (0.5, 0.3), "voxel_size_zyx must be three positive"),
        ((13, 34, 35), (3, 13, 34, 35), (0.5, 0.0, 0.3), "voxel_size_zyx must be three positive"),
    ],
)
def test_bad_input_names_the_volume_or_parameter(bf_shape, panel_shape, voxel, match):
    with pytest.raises(ValueError, match=match):
        viewer.volume_viewer(np.zeros(bf_shape), {"model": np.zeros(panel_shape)}, voxel, ["A", "B", "C"])


def test_size_of_a_quick_profile_viewer():
    """A quick-profile FOV (16 x 96 x 96) with truth, target and three models stays under 1.5 MB."""
    bf, truth, target, pred = _fov(shape=(16, 96, 96), channels=6)
    html = viewer.volume_viewer(bf, {"truth": truth, "target": target, "U": pred, "W": pred * 0.8, "WU": pred * 1.1},
                                VOXEL)
    assert 0.2e6 < len(html) < 1.5e6


def test_check_viewers_reads_the_probe():
    good = {"id": "vv-1", "controls": True, "depth": 13, "images": 4, "empty": 0, "undecoded": 0,
            "bf_changed": True, "line_moved": True, "z_changed": 4, "channel_changed": 3}
    assert browser.check_viewers({"viewers": [good]}) == []
    assert browser.check_viewers({}) == []  # a page without viewers
    for change, words in [({"bf_changed": False}, "z-slider"), ({"line_moved": False}, "z-line"),
                          ({"channel_changed": 0}, "another channel"), ({"empty": 2}, "without a source"),
                          ({"undecoded": 1}, "do not decode"), ({"controls": False}, "no z-slider"),
                          ({"depth": 1}, "1 position")]:
        errors = browser.check_viewers({"viewers": [{**good, **change}]})
        assert len(errors) == 1 and words in errors[0], (change, errors)


def test_viewers_answer_their_controls_in_chromium(tmp_path):
    """Two viewers on one page work independently; one whose script is gone fails the check."""
    chromium = chromium_or_fail()
    bf, truth, target, pred = _fov()
    panels = {"truth": truth, "target": target, "model": pred}
    html = tmp_path / "_build" / "html"
    html.mkdir(parents=True)
    two = "".join(viewer.volume_viewer(bf, panels, VOXEL, ["A", "B", "C"], title=f"FOV {i}") for i in range(2))
    (html / "index.html").write_text(f"<html><body><main>{two}</main></body></html>")
    dead = re.sub(r"<script>.*?</script>", "", viewer.volume_viewer(bf, panels, VOXEL, ["A", "B", "C"]), flags=re.S)
    (html / "dead.html").write_text(f"<html><body><main>{dead}</main></body></html>")
    reports = {r.page: r for r in browser.check_book(html, results_page=None, chromium=chromium, log=lambda s: None)}
    assert reports["index.html"].errors == [] and reports["index.html"].viewers == 2
    assert reports["dead.html"].viewers == 1
    assert any("z-slider did not change" in e for e in reports["dead.html"].errors), reports["dead.html"].errors
