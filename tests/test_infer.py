"""Whole-FOV inference and its tiled fallback (thesis 3.1.1: one pass, no stitching), and seams."""
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from vstain.infer import (RECEPTIVE_RADIUS, axis_tiles, default_roi, measure_seams, plan, predict_tiled,
                          predict_volume, tile_borders)
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


@pytest.mark.parametrize("size, tile, overlap", [(256, 128, 0.875), (200, 64, 0.25), (104, 40, 0.5), (96, 96, 0.25),
                                                 (48, 8, 0.0), (72, 32, 0.3), (48, 40, 0.25), (1000, 176, 0.25)])
def test_axis_tiles_partition_the_axis_on_the_8_grid(size, tile, overlap):
    tiles = axis_tiles(size, tile, overlap)
    starts, los, his = (np.array(v) for v in zip(*tiles))
    assert starts[0] == 0 and starts[-1] == size - tile and (np.diff(starts) > 0).all()
    assert los[0] == 0 and his[-1] == size and (los[1:] == his[:-1]).all() and (his > los).all()
    assert (starts % 8 == 0).all() and (los % 8 == 0).all()
    halo = np.ceil(overlap * tile / 2)  # every core this far inside its tile, but on the volume's faces
    assert (los[1:] - starts[1:] >= halo).all() and (starts[:-1] + tile - his[:-1] >= halo).all()


def test_axis_tiles_rejects_an_overlap_that_leaves_no_core():
    with pytest.raises(ValueError, match="overlap=0.9 leaves a tile of 16 voxels no core"):
        axis_tiles(72, 16, 0.9)


@pytest.fixture(scope="module")
def exact_case(gen):
    """X (250, reflect-padded to 256) tiled by 128-voxel tiles whose cores lie >= RECEPTIVE_RADIUS
    inside them (halo 56, the smallest exact one); Z and Y (13, padded to 16) whole in every tile."""
    x = structured((8, 13, 250))
    roi, overlap = (8, 13, 128), 0.875
    grid = axis_tiles(256, 128, overlap)
    assert min(lo - s for s, lo, _ in grid[1:]) >= RECEPTIVE_RADIUS
    assert min(s + 128 - hi for s, _, hi in grid[:-1]) >= RECEPTIVE_RADIUS
    return x, roi, overlap


def test_volume_statistics_tile_seamlessly_and_per_tile_statistics_do_not(gen, exact_case):
    x, roi, overlap = exact_case
    vol = measure_seams(gen, x, roi, overlap, norm="volume")
    assert vol["corr"].min() > MIN_CORR and vol["border_ratio"].max() < MAX_BORDER_RATIO
    assert vol["max_rel"].max() < 1e-5  # the one-pass prediction to float32 rounding
    tile = measure_seams(gen, x, roi, overlap, norm="tile")
    assert tile["corr"].min() < MIN_CORR  # per-tile statistics: the tiles disagree
    assert tile["max_rel"].max() > 0.05


def whole_statistics(gen, x) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per InstanceNorm layer: per-channel mean and (biased) variance of its input in a one-pass
    prediction of ``x [1, Z, Y, X]``."""
    stats = []
    hooks = [m.register_forward_hook(lambda m, a, o: stats.append(torch.var_mean(a[0][0], (1, 2, 3), correction=0)))
             for m in gen.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    with torch.inference_mode():
        gen(torch.from_numpy(x)[None])
    for h in hooks:
        h.remove()
    return [(mean.double().numpy(), var.double().numpy()) for var, mean in stats]


@pytest.mark.parametrize("zyx, roi, overlap, layers", [
    ((8, 13, 250), (8, 13, 128), 0.875, slice(None)),  # cores >= the receptive radius inside: every layer
    ((10, 37, 43), (10, 24, 32), 0.25, slice(0, 4)),  # halo 8: the layers that see at most 8 voxels around
])
def test_statistics_over_tiles_equal_the_whole_volume_statistics(gen, zyx, roi, overlap, layers):
    x = structured(zyx, seed=2)
    expected = whole_statistics(gen, x)
    with torch.inference_mode():
        got = predict_tiled(gen, torch.from_numpy(x)[None], roi, overlap).stats
    assert len(got) == len(expected) == 14
    for (m, v), (em, ev) in list(zip(got, expected))[layers]:
        np.testing.assert_allclose(m.numpy(), em, rtol=1e-5, atol=1e-5 * np.sqrt(ev.max()))
        np.testing.assert_allclose(v.numpy(), ev, rtol=1e-4)


def test_batches_of_tiles_give_the_same_prediction(gen):
    x = torch.from_numpy(structured((10, 37, 43), seed=3))[None]
    with torch.inference_mode():
        one = predict_tiled(gen, x, (10, 24, 32), 0.25)
        four = predict_tiled(gen, x, (10, 24, 32), 0.25, sw_batch_size=4)
    assert [len(a) for a in one.grid] == [1, 3, 2] and one.passes == 15
    scale = one.prediction.abs().max().item()  # batched convolutions round differently
    np.testing.assert_allclose(four.prediction.numpy(), one.prediction.numpy(), rtol=1e-5, atol=1e-5 * scale)


def test_tile_borders_lie_where_tiles_meet():
    _, _, x = tile_borders((8, 13, 250), (8, 13, 128), 0.875)  # padded by 3 on each side of X
    starts, cores, ends = range(16, 129, 16), range(72, 185, 16), range(127, 252, 16)  # axis_tiles(256, 128, .875)
    assert x.tolist() == sorted({*[s - 3 for s in starts], *[c - 4 for c in cores], *[c - 3 for c in cores],
                                 *[e - 3 for e in ends if e - 3 < 249]})
    z, y, x = tile_borders((20, 100, 120), (20, 64, 64), 0.25, norm="tile")  # MONAI: starts 0, 36 and 0, 48, 56
    assert z.size == 0 and y.tolist() == [36, 63] and x.tolist() == [48, 56, 63, 111]


def test_predict_volume_says_which_normalisation_it_used(gen):
    x = structured((9, 30, 41))
    with pytest.warns(UserWarning, match=r"whole-volume statistics \(15 passes over 4 tiles\)"):
        out = predict_volume(gen, x, max_voxels=0, roi_size=(9, 24, 32), overlap=0.25)
    assert out.shape == (6, 9, 30, 41) and out.dtype == np.float32 and gen.training


def test_default_tiling_keeps_a_receptive_field_halo_and_matches_the_whole_prediction(gen):
    x = structured((8, 13, 250))
    whole = predict_volume(gen, x)
    with pytest.warns(UserWarning, match=r"halo=56 \(the receptive field\)"):
        tiled = predict_volume(gen, x, max_voxels=0, roi_size=(8, 16, 128))
    assert np.abs(tiled - whole).max() <= 1e-5 * np.abs(whole).max()


def test_plan_and_default_roi():
    assert plan((9, 37, 50), 16 * 40 * 56) == "whole"  # padded to 16 x 40 x 56
    assert plan((9, 37, 50), 16 * 40 * 56 - 1) == "tiled"
    roi = default_roi((64, 624, 924), 32 * 128 * 128)  # keeps the whole Z range
    assert roi[0] == 64 and roi[1] == roi[2] and roi[1] % 8 == 0 and np.prod(roi) <= 32 * 128 * 128
    assert default_roi((12, 20, 30), 10) == (8, 8, 8)  # never below 8, even over budget


@pytest.mark.parametrize("bad", [np.zeros((16, 16, 16), np.float32), np.zeros((1, 1, 16, 16, 16), np.float32)])
def test_rejects_wrong_rank(gen, bad):
    with pytest.raises(ValueError, match=r"\[1, Z, Y, X\]"):
        predict_volume(gen, bad)


def test_rejects_too_small_volume(gen):
    with pytest.raises(ValueError, match="at least 8"):
        predict_volume(gen, np.zeros((1, 7, 32, 32), np.float32))


def test_rejects_unknown_norm(gen):
    with pytest.raises(ValueError, match="norm must be one of"):
        predict_volume(gen, np.zeros((1, 8, 8, 8), np.float32), norm="batch")
