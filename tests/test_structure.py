"""Scores inside the true structure (vstain.evaluate.structure): a blank prediction is called blank
before any score, and SSIM inside the dilated structure sees what the whole-volume SSIM hides."""
from __future__ import annotations

import numpy as np
import pandas as pd

from vstain.channels import TARGETS
from vstain.evaluate import structure as S


def sparse_spots(shape=(12, 33, 35), seed=0) -> np.ndarray:
    """A sparse channel: a few bright blobs on a dark background (under 5% of the voxels)."""
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape)
    for z, y, x in rng.integers([2, 4, 4], [10, 29, 31], size=(5, 3)):
        vol[z - 1:z + 2, y - 2:y + 3, x - 2:x + 3] = 1.0
    return vol + 0.01 * rng.standard_normal(shape)


def test_a_blank_prediction_keeps_a_high_ssim_but_not_inside_the_structure():
    ref = sparse_spots()
    mask = S.structure_mask(ref)
    assert 0.01 < mask.mean() < 0.2  # dilated, still sparse
    blank = np.zeros_like(ref)
    whole, inside = S.ssim_whole_and_inside(blank, ref, mask)
    good = ref + 0.005 * np.random.default_rng(1).standard_normal(ref.shape)
    good_whole, good_inside = S.ssim_whole_and_inside(good, ref, mask)
    assert whole > 0.5 and inside < 0.2  # the background carries the whole-volume SSIM of nothing
    assert good_inside > 0.9 and good_whole > 0.9
    assert S.contrast(blank, ref, mask) == 0.0
    assert abs(S.contrast(0.5 * ref, ref, mask) - 0.5) < 1e-9 and S.contrast(ref, ref, mask) == 1.0
    assert np.isnan(S.contrast(ref, ref, np.zeros_like(mask))) and not S.structure_mask(np.ones((4, 4, 4))).any()


def cells(values: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"fov_id": str(i), "model": m, "channel": c, "metric": "contrast", "value": v}
                         for (m, c), vs in values.items() for i, v in enumerate(vs)])


def test_blank_is_called_on_most_fovs_only_and_said_first():
    table = cells({("WGAN-GP", "nucleoli"): [0.02, 0.05, 0.4, 0.01], ("U-Net", "nucleoli"): [0.6, 0.7, 0.5, 0.8],
                   ("U-Net", "mito"): [0.05, 0.5, 0.6, 0.7], ("WGAN-GP", "mito"): [np.nan, 0.3, 0.4, 0.5]})
    blank = S.blank_channels(table)
    assert blank[["model", "channel", "blank", "n"]].values.tolist() == [["WGAN-GP", "nucleoli", 3, 4]]
    text = S.blank_sentence(blank)
    assert text.startswith("**Blank predictions**, read before any score: the WGAN-GP on Nucleoli (3 of 4 FOVs")
    assert "no prediction is blank" in S.blank_sentence(S.blank_channels(cells({("U-Net", "dna"): [0.9, 0.8]})))
    # a median contrast just below zero reads "0%", not "-0%"
    text = S.blank_sentence(S.blank_channels(cells({("U-Net", "nucleoli"): [-0.004, -0.003, 0.002]})))
    assert "median contrast 0% of" in text and "-0%" not in text


def test_a_blank_prediction_that_varies_is_said_to_lie_off_the_structure():
    """A prediction filling the whole nucleus instead of its envelope: no contrast on the rim,
    but it varies; the sentence and the channel verdict say its signal lies off the structure."""
    from vstain.evaluate import comparison

    z, y, x = np.mgrid[:16, :32, :32]
    r = np.sqrt((z - 8) ** 2 + (y - 16) ** 2 + (x - 16) ** 2)
    rim = np.exp(-0.5 * (r - 6) ** 2).astype(np.float32)
    mask = S.structure_mask(rim)
    filled = (r < 3.5).astype(np.float32)  # the nucleus inside its envelope, not on it
    assert abs(S.contrast(filled, rim, mask)) < 0.1 and filled.std() / rim.std() > 0.25
    table = pd.concat([cells({("U-Net", "envelope"): [0.02, 0.05, 0.03], ("WGAN-GP", "envelope"): [0.01, 0.0, 0.02]}),
                       pd.DataFrame([{"fov_id": str(i), "model": "U-Net", "channel": "envelope", "metric": "spread",
                                      "value": v} for i, v in enumerate([0.5, 0.45, 0.55])]),
                       pd.DataFrame([{"fov_id": str(i), "model": "WGAN-GP", "channel": "envelope", "metric": "spread",
                                      "value": 0.01} for i in range(3)])])
    blank = S.blank_channels(table).set_index("model")
    assert bool(blank.loc["U-Net", "off"]) and not bool(blank.loc["WGAN-GP", "off"])
    assert blank.loc["U-Net", "median_spread"] == 0.5
    text = S.blank_sentence(blank.reset_index())
    assert "the U-Net on Nuclear envelope (3 of 3 FOVs, median contrast 3% of the reference's; its prediction " \
           "varies, 50% of the reference's spread, but off the structure)" in text
    assert "the WGAN-GP on Nuclear envelope (3 of 3 FOVs, median contrast 1% of the reference's)" in text
    comps = pd.DataFrame(columns=["model_a", "model_b", "channel", "metric"])
    lines = comparison.channel_sentences(comps, "U-Net", "WGAN-GP", blank.reset_index())
    assert lines == ["**Nuclear envelope**: the U-Net puts its signal off it (blank on 3 of 3 FOVs); "
                     "the WGAN-GP predicts almost none of it (blank on 3 of 3 FOVs); not scored on any FOV."]


def test_structure_table_calls_a_blank_model_and_keeps_a_faithful_one(tmp_path):
    """On a processed set of sparse blobs: the truth copied scores contrast 1 and no blank channel;
    a prediction of zeros is blank on every channel, though its whole-volume SSIM stays high."""
    from test_seeds import _blob_set

    from vstain.volumes import read_volume, write_volume

    stage, faithful = _blob_set(tmp_path)
    zeros = tmp_path / "zeros"
    for f in faithful.glob("*.tif"):
        write_volume(zeros / f.name, np.zeros_like(read_volume(f)))
    table = S.structure_table(stage, {"copy": faithful, "zeros": zeros})
    assert set(table["reference"]) == {"truth"} and set(table["metric"]) == {"ssim", "ssim_fg", "contrast", "spread"}
    common = table[table["channel"].isin(["dna", "membrane"])]  # every FOV carries them: the copy is exact
    med = common.groupby(["model", "metric"])["value"].median()
    assert med["copy", "contrast"] > 0.99 and med["zeros", "contrast"] == 0
    assert med["zeros", "ssim_fg"] < med["zeros", "ssim"]
    assert med["copy", "spread"] > 0.99 and med["zeros", "spread"] == 0
    blank = S.blank_channels(table)
    assert sorted(blank.loc[blank["model"] == "zeros", "channel"]) == sorted(TARGETS)
    assert not blank.loc[blank["model"] == "zeros", "off"].any()  # zeros vary nowhere: nothing, not off
    assert not ({"dna", "membrane"} & set(blank.loc[blank["model"] == "copy", "channel"]))
    summary = S.structure_summary(table)
    assert list(summary.index) == list(TARGETS) and ("contrast", "copy") in summary.columns


def test_the_through_focus_sentence_says_what_the_slices_measure():
    from vstain.data.stage import brightfield_contrast, contrast_through_focus

    lower = np.array([0.05, 0.05, 0.02, 0.01, 0.02, 0.05])
    text = contrast_through_focus(lower, (2, 5), 0.5)
    assert text.startswith("In this FOV the relative contrast is weakest at z = 1.5 µm (0.010), inside the true")
    assert "lower in focus on average, as for a weak phase object" in text
    assert "higher in focus on average" in contrast_through_focus(lower.max() - lower + 0.01, (2, 5), 0.5)
    assert "no slice on the other side" in contrast_through_focus(lower, (0, 6), 0.5)
    assert "real data give no true in-focus range" in contrast_through_focus(lower, None, 0.5)
    flat = np.ones((1, 3, 4, 5)) * np.array([1.0, 2.0, 3.0])[:, None, None]
    assert np.allclose(brightfield_contrast(flat), 0)
