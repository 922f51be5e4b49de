"""The simulator's true instance labels follow their FOV through stages 01 -> 03: cropped in Y X
with the FOV (01_data's crop_yx) and in Z to the focus window (02_plls), written as uint16 beside
the processed volume (03), never interpolated or normalised; a FOV without labels passes through."""
import numpy as np
import pandas as pd
import pytest
import tifffile
from test_denoise import TINY, identity_n2v

from vstain.channels import ALLEN_PACKAGE, LABEL_CHANNELS
from vstain.data import stage
from vstain.preprocess import denoise, processed, stages
from vstain.volumes import read_labels, write_labels

SHAPE, CROP_YX, WINDOW = (33, 40, 38), (33, 35), 9  # odd, unequal; the crop is off-centre by half a voxel


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """01 -> 02 -> 03 on three simulated FOVs (N2V replaced by the identity), FOV "1" stripped of
    its labels in fovs.csv as a real-data FOV would be."""
    root = tmp_path_factory.mktemp("labels")
    stage.run_data_stage(root / "01", n_per_structure=3, shape=SHAPE, structures=("TOMM20",), crop_yx=CROP_YX, seed=2)
    fovs = pd.read_csv(root / "01" / stage.FOVS_CSV, dtype={"fov_id": str})
    fovs.loc[fovs["fov_id"] == "1", "labels_path"] = ""
    fovs.to_csv(root / "01" / stage.FOVS_CSV, index=False)
    stages.run_focus_stage(root / "01", root / "02", window=WINDOW)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(denoise, "train_n2v", identity_n2v)
        stages.run_denoise_stage(root / "01", root / "02", root / "03", denoise.N2VConfig(**TINY),
                                     bm3d_max_volumes=0, nlm_max_volumes=0)
    return root


def test_labels_survive_the_focus_crop(staged):
    focus = stages.read_focus(staged / "02").set_index("fov_id")
    manifest = processed.read_manifest(staged / "03").set_index("fov_id", drop=False)
    y0, x0 = (SHAPE[1] - CROP_YX[0]) // 2, (SHAPE[2] - CROP_YX[1]) // 2
    for fid in ("0", "2"):
        row = manifest.loc[fid]
        labels = processed.load_labels(row)
        bf, _, _ = processed.load_fov(row)
        assert labels.dtype == np.uint16 and labels.shape == (len(LABEL_CHANNELS), *bf.shape[1:])
        assert labels.shape[1:] == (WINDOW, *CROP_YX)
        source = tifffile.imread(staged / "01" / "registry" / ALLEN_PACKAGE / "truth_labels_path" / f"{fid}_labels.ome.tiff")
        lo, hi = int(focus.loc[fid, "z_lo"]), int(focus.loc[fid, "z_hi"])
        expected = source[:, lo:hi, y0:y0 + CROP_YX[0], x0:x0 + CROP_YX[1]]
        assert np.array_equal(labels, expected)
        assert labels[0].max() >= 2 and set(np.unique(labels[1])) - {0} <= set(np.unique(labels[0]))  # nucleus k in cell k


def test_a_fov_without_labels_passes_through(staged):
    manifest = processed.read_manifest(staged / "03").set_index("fov_id", drop=False)
    assert manifest.loc["1", "labels_path"] == "" and processed.load_labels(manifest.loc["1"]) is None
    assert manifest.loc["1", "truth_path"] != ""  # only the labels were missing
    fov = stage.read_stage_fov(stage.read_fovs(staged / "01").set_index("fov_id", drop=False).loc["1"])
    assert fov.labels is None and fov.truth is not None


def test_a_manifest_written_before_labels_reads_as_none(staged, tmp_path):
    old = pd.read_csv(staged / "03" / processed.MANIFEST_CSV, dtype={"fov_id": str}).drop(columns="labels_path")
    old.to_csv(tmp_path / processed.MANIFEST_CSV, index=False)
    back = processed.read_manifest(tmp_path)
    assert (back["labels_path"] == "").all() and processed.load_labels(back.iloc[0]) is None


@pytest.mark.parametrize("labels,match", [
    (np.full((2, 3, 5, 4), -1, np.int32), "integers in"),
    (np.full((2, 3, 5, 4), 70000, np.int64), "integers in"),
    (np.zeros((2, 3, 5, 4), np.float32), "integers in"),
    (np.zeros((3, 5, 4), np.uint16), r"must be \[2, Z, Y, X\]"),
])
def test_write_labels_refuses_what_uint16_cannot_hold(tmp_path, labels, match):
    with pytest.raises(ValueError, match=match):
        write_labels(tmp_path / "l.tif", labels, LABEL_CHANNELS)


def test_labels_round_trip_and_read_labels_rejects_images(tmp_path):
    labels = np.random.default_rng(0).integers(0, 300, (2, 3, 7, 5)).astype(np.int64)
    write_labels(tmp_path / "l.tif", labels, LABEL_CHANNELS)
    back = read_labels(tmp_path / "l.tif")
    assert back.dtype == np.uint16 and np.array_equal(back, labels)
    tifffile.imwrite(tmp_path / "f.tif", labels.astype(np.float32))
    with pytest.raises(ValueError, match="f.tif: expected uint16"):
        read_labels(tmp_path / "f.tif")
