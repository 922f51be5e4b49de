"""Whole-FOV inference and its tiled fallback (thesis 3.1.1: one pass, no stitching), and seams."""
import os
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from vstain.inference import layerwise
from vstain.inference.infer import default_roi, measure_seams, plan, predict_volume, tile_borders
from vstain.inference.layerwise import Moments, predict_layerwise, scratch_bytes, tile_bounds
from vstain.models import Generator, GeneratorConfig

MIN_CORR, MAX_BORDER_RATIO = 0.999, 1.2  # seamless: tiled ~ one pass, no excess difference at tile borders


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    return Generator(GeneratorConfig(base_width=4))


def structured(zyx, seed=0) -> np.ndarray:
    """A brightfield-like ``[1, Z, Y, X]`` volume: a Y-X gradient plus smooth blobs plus a little
    noise, so tiles in different places have different statistics."""
    rng = np.random.default_rng(seed)
    _, yy, xx = np.meshgrid(*[np.linspace(0, 1, n) for n in zyx], indexing="ij")
    blobs = ndimage.gaussian_filter(rng.normal(size=zyx), (1, 4, 4))
    return (2 * yy + 3 * xx + 10 * blobs + 0.1 * rng.normal(size=zyx)).astype(np.float32)[None]


@pytest.mark.parametrize("zyx", [(9, 37, 50), (8, 8, 8), (16, 21, 13)])
def test_whole_volume_keeps_the_shape(gen, zyx):
    x = np.random.default_rng(0).normal(size=(1, *zyx)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # whole-volume inference does not warn
        out = predict_volume(gen, x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (6, *zyx)
    assert gen.training  # the module's mode is restored


def test_tile_mode_agrees_roughly_with_whole_volume(gen):
    """Per-tile normalisation and zero padding at tile borders, down-weighted by the Gaussian
    blending: on stationary noise a small difference."""
    x = np.random.default_rng(1).normal(size=(1, 16, 96, 80)).astype(np.float32)
    whole = predict_volume(gen, x)
    with pytest.warns(UserWarning, match="per tile, gaussian"):
        tiled = predict_volume(gen, torch.from_numpy(x), max_voxels=16 * 64 * 64, roi_size=(16, 64, 64),
                               overlap=0.5, norm="tile")
    assert tiled.shape == whole.shape
    assert np.abs(tiled - whole).mean() < 0.1 * np.abs(whole).mean()
    assert np.corrcoef(tiled.ravel(), whole.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("size, tile", [(256, 128), (200, 64), (104, 40), (96, 96), (48, 8), (72, 32), (928, 176), (16, 3)])
def test_tile_bounds_partition_the_axis_on_the_8_grid(size, tile):
    bounds = np.array(tile_bounds(size, tile))
    assert bounds[0] == 0 and bounds[-1] == size and (np.diff(bounds) > 0).all() and (bounds % 8 == 0).all()
    assert np.diff(bounds).max() <= max(tile, 8) + 8  # near-equal tiles of about `tile` voxels, on the 8-grid
    assert len(bounds) - 1 == -(-size // max(tile, 8))


@pytest.fixture(scope="module")
def seam_case():
    """A volume that fits whole, tiled by Y-X tiles much smaller than it: X (250, padded to 256)
    in two tiles of 128, Y (61, padded to 64) in four of 16."""
    return structured((8, 61, 250)), (8, 16, 128)


def test_volume_statistics_tile_seamlessly_and_per_tile_statistics_do_not(gen, seam_case):
    x, roi = seam_case
    vol = measure_seams(gen, x, roi, norm="volume")
    assert vol["corr"].min() > MIN_CORR and vol["border_ratio"].max() < MAX_BORDER_RATIO
    assert vol["max_rel"].max() < 1e-5  # the one-pass prediction to float32 rounding, borders included
    tile = measure_seams(gen, x, roi, overlap=0.25, norm="tile")
    assert tile["corr"].min() < MIN_CORR  # per-tile statistics: the tiles disagree (blended: everywhere)
    assert tile["max_rel"].max() > 0.05
    butted = measure_seams(gen, x, roi, overlap=0.0, norm="tile")  # without overlap: most where they meet
    assert butted["border_ratio"].max() > MAX_BORDER_RATIO and butted["corr"].min() < MIN_CORR


@pytest.mark.parametrize("zyx, tile", [((10, 37, 43), (24, 32)), ((8, 8, 8), (8, 8)), ((17, 70, 90), (16, 24))])
def test_layerwise_equals_the_one_pass_prediction(gen, zyx, tile, tmp_path):
    """Any shape (8x8x8 brings the bottleneck down to one voxel) and tile; the scratch files go."""
    x = torch.from_numpy(structured(zyx, seed=2))[None]
    with torch.inference_mode():
        whole = gen.eval()(x)
        tiled = predict_layerwise(gen, x, tile, workdir=tmp_path)
    gen.train()
    assert tiled.shape == whole.shape == (1, 6, *zyx)
    np.testing.assert_allclose(tiled.numpy(), whole.numpy(), rtol=0, atol=2e-6 * whole.abs().max().item())
    assert list(tmp_path.iterdir()) == []


def test_moments_of_tiles_are_the_moments_of_the_volume():
    rng = np.random.default_rng(5)
    vol = (rng.normal(size=(3, 4, 30, 50)) * [[[[1]]], [[[10]]], [[[0.01]]]] + [[[[0]]], [[[1e3]]], [[[-5]]]])
    m = Moments(3)
    for y0, y1 in [(0, 7), (7, 8), (8, 30)]:
        for x0, x1 in [(0, 16), (16, 50)]:
            m.add(torch.from_numpy(vol[:, :, y0:y1, x0:x1]).float())
    flat = vol.astype(np.float32).astype(np.float64).reshape(3, -1)
    assert m.n == flat.shape[1]
    np.testing.assert_allclose(m.mean.numpy(), flat.mean(1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m.var().numpy(), flat.var(1), rtol=1e-5)


def test_layerwise_batch_norm_uses_its_running_statistics(tmp_path):
    torch.manual_seed(1)
    gen = Generator(GeneratorConfig(base_width=4, norm="batch")).eval()
    for m in gen.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2), m.weight.data.normal_()
    x = torch.from_numpy(structured((9, 40, 50), seed=4))[None]
    with torch.inference_mode():
        whole, tiled = gen(x), predict_layerwise(gen, x, (16, 16), workdir=tmp_path)
    np.testing.assert_allclose(tiled.numpy(), whole.numpy(), rtol=0, atol=2e-6 * whole.abs().max().item())


def test_layerwise_refuses_a_disk_too_small_and_other_networks(gen, tmp_path, monkeypatch):
    x = torch.zeros(1, 1, 8, 64, 64)
    with pytest.raises(ValueError, match="eval mode"):
        predict_layerwise(gen, x, (32, 32), workdir=tmp_path)  # the fixture is in train mode
    assert scratch_bytes(gen, (8, 64, 64)) == 2.5 * 4 * 8 * 64 * 64 * 4
    monkeypatch.setattr(layerwise.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(layerwise.ScratchSpaceError, match=f"needs about .* GiB of scratch space in {tmp_path}, "
                                                          "which has 0.0 GiB free"):
        predict_layerwise(gen.eval(), x, (32, 32), workdir=tmp_path)
    gen.train()
    with pytest.raises(TypeError, match="needs a vstain Generator, got Conv3d"):
        predict_layerwise(torch.nn.Conv3d(1, 6, 3), x, (32, 32))


def test_layerwise_leaves_no_file_open_or_behind_after_an_error(gen, tmp_path, monkeypatch):
    def fail(self, *box):
        raise RuntimeError("a failure half-way")
    monkeypatch.setattr(layerwise.Up, "read", fail)  # the decoder: three stores are open by then
    with torch.inference_mode(), pytest.raises(RuntimeError, match="half-way"):
        predict_layerwise(gen.eval(), torch.from_numpy(structured((8, 40, 40)))[None], (16, 16), workdir=tmp_path)
    gen.train()
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [f for f in open_files if str(tmp_path) in f] and list(tmp_path.iterdir()) == []


def test_tile_borders_lie_where_tiles_meet():
    z, y, x = tile_borders((8, 61, 250), (8, 16, 128))  # padded by 1-2 in Y, 3 on each side of X
    assert z.size == 0 and y.tolist() == [14, 15, 30, 31, 46, 47] and x.tolist() == [124, 125]
    z, y, x = tile_borders((20, 100, 120), (20, 64, 64), 0.25, norm="tile")  # MONAI: starts 0, 36 and 0, 48, 56
    assert z.size == 0 and y.tolist() == [36, 63] and x.tolist() == [48, 56, 63, 111]


def test_predict_volume_says_which_normalisation_it_used(gen):
    x = structured((9, 30, 41))
    with pytest.warns(UserWarning, match=r"layer by layer in Y-X tiles of about 24x32 \(all of Z\)"):
        out = predict_volume(gen, x, max_voxels=0, roi_size=(9, 24, 32))
    assert out.shape == (6, 9, 30, 41) and out.dtype == np.float32 and gen.training


def test_default_tiling_matches_the_whole_prediction(gen):
    x = structured((8, 13, 250))
    whole = predict_volume(gen, x)
    with pytest.warns(UserWarning, match="whole-volume statistics"):
        tiled = predict_volume(gen, x, max_voxels=8 * 16 * 64)
    assert np.abs(tiled - whole).max() <= 1e-5 * np.abs(whole).max()


def test_plan_and_default_roi():
    assert plan((9, 37, 50), 16 * 40 * 56) == "whole"  # padded to 16 x 40 x 56
    assert plan((9, 37, 50), 16 * 40 * 56 - 1) == "tiled"
    roi = default_roi((64, 624, 924), 32 * 128 * 128)  # keeps the whole Z range
    assert roi[0] == 64 and roi[1] == roi[2] and roi[1] % 8 == 0 and np.prod(roi) <= 32 * 128 * 128
    assert default_roi((12, 20, 30), 10) == (8, 8, 8)  # never below 8, even over budget
    assert default_roi((200, 624, 924), 200 * 64 * 64, all_z=True) == (200, 64, 64)  # all of Z; the budget sets Y-X
    assert default_roi((61, 624, 924), 64 * 176 * 176 + 1, all_z=True) == (64, 176, 176)  # Z padded to 64


@pytest.mark.parametrize("bad", [np.zeros((16, 16, 16), np.float32), np.zeros((1, 1, 16, 16, 16), np.float32)])
def test_rejects_wrong_rank(gen, bad):
    with pytest.raises(ValueError, match=r"\[1, Z, Y, X\]"):
        predict_volume(gen, bad)


@pytest.mark.parametrize("max_voxels", [None, 0])  # whole and tiled
def test_rejects_too_small_volume(gen, max_voxels):
    with pytest.raises(ValueError, match="at least 8"):
        predict_volume(gen, np.zeros((1, 7, 32, 32), np.float32), max_voxels=max_voxels)


def test_rejects_unknown_norm_and_an_overlap_it_would_ignore(gen):
    with pytest.raises(ValueError, match="norm must be one of"):
        predict_volume(gen, np.zeros((1, 8, 8, 8), np.float32), norm="batch")
    with pytest.raises(ValueError, match="applies to norm='tile' only, got 0.25 with norm='volume'"):
        predict_volume(gen, np.zeros((1, 8, 8, 8), np.float32), overlap=0.25)
