"""Segmentation-based evaluation (vstain.evaluate.segment, vstain.evaluate.downstream) and the
simulator's true instance labels it is scored against."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage

from vstain.channels import ALLEN_PACKAGE, TARGETS
from vstain.data.registry import write_registry
from vstain.data.simulate import SimConfig, simulate_fov
from vstain.evaluate.downstream import (CHANNELS, drop_edge, instance_table, iou_matrix, match_instances, noise_ceiling,
    plausibility)
from vstain.evaluate.segment import cell_layer, segment_cells, segment_nuclei

SMALL = SimConfig(shape=(32, 100, 100))  # 30 µm: whole cells inside the FOV
PX = SMALL.pixel_size


def _z(a: np.ndarray) -> np.ndarray:
    """z-score per channel, as the processed set normalises a FOV."""
    axes = tuple(range(a.ndim - 3, a.ndim))
    return (a - a.mean(axis=axes, keepdims=True)) / a.std(axis=axes, keepdims=True)


@pytest.fixture(scope="module")
def fovs() -> list[dict]:
    return [simulate_fov(SMALL, "mito", seed) for seed in (0, 2, 4)]


# ----------------------------------------------------------------------------------------------
# the simulator's true instances


def test_labels_agree_with_the_clean_truth(fovs):
    for f in fovs:
        cells, nuclei = f["labels"]["cells"], f["labels"]["nuclei"]
        assert cells.dtype == nuclei.dtype == np.uint16 and cells.shape == nuclei.shape == SMALL.shape
        np.testing.assert_array_equal(cells > 0, f["masks"]["cell"])
        np.testing.assert_array_equal(nuclei > 0, f["masks"]["nucleus"])
        ids = np.unique(cells[cells > 0])
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # 1..N, no gaps
        inside = nuclei > 0
        np.testing.assert_array_equal(nuclei[inside], cells[inside])  # the nucleus of cell k is k
        # each cell is one lattice site of the Voronoi layer
        for k in ids:
            assert len(np.unique(np.broadcast_to(f["masks"]["label"], cells.shape)[cells == k])) == 1
        dna, nl = (f["truth"][TARGETS.index(c)] - f["truth"][TARGETS.index(c)].min() for c in ("dna", "nucleoli"))
        near = ndimage.binary_dilation(inside, iterations=2)
        assert dna[near].sum() > 0.95 * dna.sum() and nl[near].sum() > 0.98 * nl.sum()


def test_registry_writes_readable_labels(tmp_path):
    cfg = SimConfig(shape=(32, 37, 41))
    write_registry(tmp_path, 1, cfg, seed=5, structures=("envelope",))
    meta = pd.read_csv(tmp_path / ALLEN_PACKAGE / "metadata.csv")
    cols = list(meta.columns)
    assert cols.index("truth_labels_path") == cols.index("truth_path") + 1
    row = meta.iloc[0]
    with tifffile.TiffFile(tmp_path / ALLEN_PACKAGE / row["truth_labels_path"]) as tif:
        labels = tif.series[0].asarray()
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert labels.shape == (2, *cfg.shape) and labels.dtype == np.uint16
    assert [c["Name"] for c in pixels["Channel"]] == ["cells", "nuclei"]
    f = simulate_fov(cfg, "envelope", np.random.SeedSequence([5, 0]).generate_state(1)[0])
    np.testing.assert_array_equal(labels[0], f["labels"]["cells"])
    np.testing.assert_array_equal(labels[1], f["labels"]["nuclei"])


# ----------------------------------------------------------------------------------------------
# segmentation of the clean truth


def test_segmentation_of_the_clean_truth_recovers_the_true_instances(fovs):
    nuc_f1, cell_iou = [], []
    for f in fovs:
        truth = _z(f["truth"])
        nuclei = segment_nuclei(truth[0], PX)
        cells = segment_cells(truth[1], nuclei, voxel_size_zyx=PX)
        assert nuclei.dtype == cells.dtype == np.int32
        inside = nuclei > 0
        np.testing.assert_array_equal(cells[inside], nuclei[inside])  # cell k holds nucleus k
        nuc_f1.append(match_instances(nuclei, f["labels"]["nuclei"])["f1"])
        # every true nucleus is found but those the FOV border cuts
        iou, _, _ = iou_matrix(nuclei, f["labels"]["nuclei"])
        true_ids = np.unique(f["labels"]["nuclei"])[1:]
        border = np.unique(np.concatenate([f["labels"]["nuclei"][:, [0, -1]].ravel(),
                                           f["labels"]["nuclei"][:, :, [0, -1]].ravel()]))
        missed = true_ids[iou.max(axis=1) <= 0.5]
        assert np.isin(missed, border).all()
        # and nothing else, but where the border cuts a nucleus (through its DNA-poor nucleolus, a
        # cut nucleus can fall apart in two)
        pred_border = np.unique(np.concatenate([nuclei[:, [0, -1]].ravel(), nuclei[:, :, [0, -1]].ravel()]))
        inner = ~np.isin(np.unique(nuclei)[1:], pred_border)
        assert iou.max(axis=0)[inner].min() > 0.5
        assert match_instances(nuclei, f["labels"]["nuclei"], exclude_edge=True)["f1"] == 1.0
        interior = match_instances(cells, f["labels"]["cells"], exclude_edge=True)
        assert interior["f1"] == 1.0
        cell_iou.append(interior["mean_iou"])
    assert np.mean(nuc_f1) > 0.85, nuc_f1
    assert min(cell_iou) > 0.85, cell_iou


def test_segmentation_does_not_depend_on_the_intensity_scale(fovs):
    f = fovs[1]
    raw, z = f["truth"][0], _z(f["truth"][0])
    a, b = segment_nuclei(raw, PX), segment_nuclei(z, PX)
    m = match_instances(a, b)
    assert m["f1"] == 1.0 and m["mean_iou"] > 0.99
    c = match_instances(segment_cells(3 * f["truth"][1] + 7, a, voxel_size_zyx=PX),
                        segment_cells(_z(f["truth"][1]), a, voxel_size_zyx=PX))
    assert c["f1"] == 1.0 and c["mean_iou"] > 0.99


def test_cell_layer_spans_basal_to_apical_membrane(fovs):
    f = fovs[0]
    layer, cells = cell_layer(f["truth"][1], PX), f["masks"]["cell"]
    assert (layer & cells).sum() > 0.9 * cells.sum()
    assert not layer[: f["focus_z_lo"] - 3].any() and not layer[f["focus_z_hi"] + 3:].any()


@pytest.mark.parametrize("bad,match", [
    (dict(dna=np.full((9, 13, 15), np.nan, np.float32)), "dna has NaN"),
    (dict(dna=np.ones((13, 15))), "one channel Z Y X"),
    (dict(dna=np.ones((9, 13, 15))), "dna is constant"),
    (dict(dna=np.arange(9 * 13 * 15.0).reshape(9, 13, 15), voxel_size_zyx=(0.5, 0.0, 0.3)), "voxel_size_zyx"),
])
def test_segment_nuclei_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        segment_nuclei(**bad)


def test_segment_cells_rejects_mismatched_nuclei():
    with pytest.raises(ValueError, match="nuclei_labels has shape"):
        segment_cells(np.random.default_rng(0).random((9, 13, 15)), np.zeros((9, 13, 14), np.int32))


# ----------------------------------------------------------------------------------------------
# instance matching on hand-made label images


def _boxes(shape: tuple[int, int, int], boxes: dict[int, tuple[slice, ...]]) -> np.ndarray:
    lab = np.zeros(shape, np.int32)
    for k, box in boxes.items():
        lab[box] = k
    return lab


SHAPE = (9, 31, 33)


def test_match_instances_shift_grow_miss_and_false_positive():
    true = _boxes(SHAPE, {1: np.s_[1:6, 2:8, 3:9],  # 5*6*6 = 180
                          2: np.s_[1:5, 12:17, 12:18],  # 4*5*6 = 120
                          7: np.s_[2:4, 22:26, 22:26]})  # missed
    pred = _boxes(SHAPE, {4: np.s_[1:6, 2:8, 4:10],  # shifted by 1 in x: 150 / 210
                          9: np.s_[1:6, 12:17, 12:18],  # one slab taller: 120 / 150, volume +25 %
                          3: np.s_[6:8, 22:30, 2:6]})  # false positive
    m = match_instances(pred, true)
    assert (m["n_true"], m["n_pred"], m["tp"], m["fp"], m["fn"]) == (3, 3, 2, 1, 1)
    assert m["f1"] == pytest.approx(4 / 6) and m["precision"] == m["recall"] == pytest.approx(2 / 3)
    assert m["mean_iou"] == pytest.approx((150 / 210 + 0.8 + 0) / 3)
    # IoU 0.714 passes t = 0.5..0.7 (5 thresholds), IoU 0.8 passes 0.5..0.75 (6 thresholds)
    assert m["f1_mean"] == pytest.approx((5 * 4 / 6 + 1 * 2 / 6) / 9)
    assert m["volume_bias"] == pytest.approx(0.125) and m["volume_error"] == pytest.approx(0.125)
    assert m["count_error"] == 0 and m["count_error_rel"] == 0
    iou, ts, ps = iou_matrix(pred, true)
    np.testing.assert_array_equal(ts, [180, 120, 32])
    np.testing.assert_array_equal(ps, [64, 180, 150])  # pred ids 3, 4, 9


def test_match_instances_merged_and_empty():
    true = _boxes(SHAPE, {1: np.s_[1:5, 2:8, 2:8], 2: np.s_[1:5, 2:8, 8:14]})
    merged = _boxes(SHAPE, {5: np.s_[1:5, 2:8, 2:14]})  # IoU 0.5 with each: not above 0.5
    m = match_instances(merged, true)
    assert m["tp"] == 0 and m["f1"] == 0 and m["mean_iou"] == 0
    assert m["count_error"] == -1 and m["count_error_rel"] == -0.5 and np.isnan(m["volume_error"])
    empty = np.zeros(SHAPE, np.int32)
    assert match_instances(empty, empty)["f1"] == 1.0
    assert match_instances(true, empty)["fp"] == 2 and np.isnan(match_instances(true, empty)["recall"])


def test_exclude_edge_drops_instances_on_the_lateral_border():
    true = _boxes(SHAPE, {1: np.s_[1:5, 0:6, 2:8], 2: np.s_[1:5, 10:16, 10:16], 3: np.s_[0:3, 20:25, 20:25]})
    kept = np.unique(drop_edge(true))
    np.testing.assert_array_equal(kept, [0, 2, 3])  # touching z is not an edge: the layer is inside
    pred = _boxes(SHAPE, {1: np.s_[1:5, 10:16, 10:16], 2: np.s_[0:3, 20:25, 20:25]})
    assert match_instances(pred, true)["f1"] == pytest.approx(0.8)
    assert match_instances(pred, true, exclude_edge=True)["f1"] == 1.0


def test_match_instances_rejects_bad_input():
    with pytest.raises(ValueError, match="integer label image"):
        match_instances(np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.int32))
    with pytest.raises(ValueError, match="pred_labels has shape"):
        match_instances(np.zeros((9, 31, 32), np.int32), np.zeros(SHAPE, np.int32))
    with pytest.raises(ValueError, match=">= 0.5"):
        match_instances(np.zeros(SHAPE, np.int32), np.zeros(SHAPE, np.int32), thresholds=(0.3, 0.5))


def test_instance_table_is_long_per_source_and_object():
    true = {"nuclei": _boxes(SHAPE, {1: np.s_[1:5, 2:8, 2:8]}), "cells": _boxes(SHAPE, {1: np.s_[0:7, 0:12, 0:12]})}
    sources = {"truth": true, "U-Net": {"nuclei": _boxes(SHAPE, {3: np.s_[1:5, 2:8, 3:9]})}}
    t = instance_table("fov7", true, sources)
    assert list(t.columns) == ["fov_id", "source", "object", "metric", "value"]
    assert set(t["source"]) == {"truth", "U-Net"} and (t["fov_id"] == "fov7").all()
    f1 = t.set_index(["source", "object", "metric"])["value"]
    assert f1["truth", "cells", "f1"] == 1.0 and f1["U-Net", "nuclei", "mean_iou"] == pytest.approx(120 / 168)
    with pytest.raises(ValueError, match="no true 'organelle'"):
        instance_table(0, true, {"x": {"organelle": true["cells"]}})


# ----------------------------------------------------------------------------------------------
# plausibility and the noise ceiling


@pytest.fixture(scope="module")
def compartments_fixture():
    shape = (11, 30, 34)
    cells = _boxes(shape, {1: np.s_[1:10, 1:15, 1:33], 2: np.s_[1:10, 15:29, 1:33]})
    nuclei = _boxes(shape, {1: np.s_[3:8, 4:11, 5:15], 2: np.s_[3:8, 18:25, 5:15]})
    return shape, nuclei, cells


def test_plausibility_of_hand_made_signals(compartments_fixture):
    shape, nuclei, cells = compartments_fixture
    pred = np.zeros((6, *shape), np.float32)
    c = {name: i for i, name in enumerate(CHANNELS)}
    pred[c["nucleoli"], 5, 7, 8] = 4.0  # entirely inside nucleus 1
    pred[c["dna"], 5, 7, 8] = pred[c["dna"], 5, 7, 25] = 2.0  # half inside, half in the cytoplasm
    pred[c["mito"], 5, 7, 25] = pred[c["mito"], 5, 20, 25] = 1.0  # both outside the nuclei
    pred[c["envelope"], 5, 4, 8] = 1.0  # on the surface of nucleus 1
    pred[c["envelope"], 5, 7, 9] = 3.0  # its centre: 1 / (1 + 3) on the envelope
    pred[c["membrane"], 5, 14:16, 20] = 1.0  # on the boundary between the cells
    pred[c["actomyosin"]] = np.nan  # not predicted
    pred = 2.5 * pred + 1.0  # offset and scale do not matter
    p = plausibility(pred, nuclei, cells, voxel_size_zyx=(0.5, 0.3, 0.3), shell_um=0.35)
    assert p["nucleoli"] == pytest.approx(1.0) and p["dna"] == pytest.approx(0.5)
    assert p["mito"] == pytest.approx(1.0) and p["envelope"] == pytest.approx(0.25)
    assert p["membrane"] == pytest.approx(1.0) and np.isnan(p["actomyosin"])
    pred[c["membrane"], 5, 7, 20] = 2.5 * 2.0 + 1.0  # as much signal again, in the cytoplasm
    assert plausibility(pred, nuclei, cells, shell_um=0.35)["membrane"] == pytest.approx(0.5)


def test_plausibility_of_the_clean_truth_is_high(fovs):
    f = fovs[2]
    p = plausibility(_z(f["truth"]), f["labels"]["nuclei"], f["labels"]["cells"], PX)
    assert p["nucleoli"] > 0.9 and p["mito"] > 0.9 and p["actomyosin"] > 0.9
    assert p["envelope"] > 0.6 and p["membrane"] > 0.6
    shuffled = np.roll(f["labels"]["nuclei"], 16, axis=0)  # nuclei in the wrong place (half the stack away in z)
    assert plausibility(_z(f["truth"]), shuffled, f["labels"]["cells"], PX)["nucleoli"] < 0.5


def test_plausibility_rejects_bad_input(compartments_fixture):
    shape, nuclei, cells = compartments_fixture
    with pytest.raises(ValueError, match="C = 6"):
        plausibility(np.zeros((5, *shape)), nuclei, cells)
    with pytest.raises(ValueError, match="no compartment.*golgi"):
        plausibility(np.zeros((1, *shape)), nuclei, cells, channels=("golgi",))


def test_noise_ceiling():
    rng = np.random.default_rng(0)
    clean = rng.random((6, 7, 13, 17)).astype(np.float32)
    measured = 3 * clean + 2  # noiseless: a scaled copy
    measured[4] = np.nan  # not labelled
    measured[1] = clean[1] + rng.normal(0, 0.29, clean[1].shape)  # noise with the signal's variance
    c = noise_ceiling(measured, clean)
    assert set(c) == set(CHANNELS) - {"actomyosin"}
    for name in ("dna", "mito", "envelope", "nucleoli"):
        assert c[name] == pytest.approx(1.0)
    assert 0.6 < c["membrane"] < 0.8  # 1 / sqrt(2) for equal signal and noise variance
    with pytest.raises(ValueError, match="C = 6"):
        noise_ceiling(measured[:5], clean[:5])


def test_channels_are_the_project_targets():
    assert CHANNELS == TARGETS
