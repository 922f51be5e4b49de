"""Whole-FOV inference and its tiled fallback (thesis 3.1.1: one pass, no stitching)."""
import warnings

import numpy as np
import pytest
import torch

from vstain.infer import default_roi, plan, predict_volume
from vstain.models import Generator, GeneratorConfig


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    return Generator(GeneratorConfig(base_width=4))


@pytest.mark.parametrize("zyx", [(9, 37, 50), (8, 8, 8), (16, 21, 13)])
def test_whole_volume_keeps_the_shape(gen, zyx):
    x = np.random.default_rng(0).normal(size=(1, *zyx)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # whole-volume inference does not warn
        out = predict_volume(gen, x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (6, *zyx)
    assert gen.training  # the module's mode is restored


def test_tiled_agrees_with_whole_volume(gen):
    """Tiles differ from the whole volume only through instance-norm statistics and zero padding
    at tile borders, which the Gaussian blending down-weights: a small difference."""
    x = np.random.default_rng(1).normal(size=(1, 16, 96, 80)).astype(np.float32)
    whole = predict_volume(gen, x)
    with pytest.warns(UserWarning, match="tiling"):
        tiled = predict_volume(gen, torch.from_numpy(x), max_voxels=16 * 64 * 64, roi_size=(16, 64, 64), overlap=0.5)
    assert tiled.shape == whole.shape
    diff = np.abs(tiled - whole)
    assert diff.mean() < 0.1 * np.abs(whole).mean()
    assert np.corrcoef(tiled.ravel(), whole.ravel())[0, 1] > 0.99


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
