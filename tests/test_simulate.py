"""The simulator (vstain.data.simulate) and its optics (vstain.data.optics): shapes, determinism, the cell
model's compartments, the brightfield physics and the Allen-layout registry."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage

from vstain.channels import ALLEN_PACKAGE, TARGETS
from vstain.data import optics
from vstain.data.registry import CHANNEL_NAMES, write_registry
from vstain.data.simulate import STRUCTURES, SimConfig, simulate_fov

SMALL = SimConfig(shape=(32, 70, 83))


@pytest.fixture(scope="module")
def fov() -> dict:
    return simulate_fov(SMALL, "mito", seed=3)


def _signal(f: dict, name: str) -> np.ndarray:
    """A truth channel with its (uniform) background removed."""
    t = f["truth"][TARGETS.index(name)]
    return t - t.min()


# ----------------------------------------------------------------------------------------------
# shapes, dtypes, determinism, configuration


@pytest.mark.parametrize("shape,structure", [((31, 41, 57), "mito"), ((33, 64, 50), "envelope"),
                                             ((32, 33, 45), "actomyosin"), ((34, 52, 38), "nucleoli")])
def test_shapes_and_dtypes(shape, structure):
    f = simulate_fov(SimConfig(shape=shape), structure, seed=1)
    for key in ("brightfield", "dna", "membrane", "struct"):
        assert f[key].shape == shape and f[key].dtype == np.uint16
    assert f["truth"].shape == (6, *shape) and f["truth"].dtype == np.float32
    assert np.isfinite(f["truth"]).all() and f["truth"].min() >= 0
    assert f["masks"]["cell"].shape == shape and f["masks"]["label"].shape == shape
    # the tagged channel is the noisy image of the structure's truth (mean = truth + offset)
    t = f["truth"][TARGETS.index(structure)]
    assert abs(f["struct"].mean() - (t.mean() + SMALL.offset)) < 0.05 * t.mean() + 1


def test_deterministic_for_a_seed(fov):
    again = simulate_fov(SMALL, "mito", seed=3)
    other = simulate_fov(SMALL, "mito", seed=4)
    for key in ("brightfield", "dna", "membrane", "struct", "truth"):
        np.testing.assert_array_equal(fov[key], again[key])
        assert not np.array_equal(fov[key], other[key])
    assert (fov["focus_z_lo"], fov["focus_z_hi"]) == (again["focus_z_lo"], again["focus_z_hi"])


def test_structure_only_picks_the_measured_channel(fov):
    nucleoli = simulate_fov(SMALL, "nucleoli", seed=3)
    np.testing.assert_array_equal(fov["truth"], nucleoli["truth"])
    assert not np.array_equal(fov["struct"], nucleoli["struct"])


def test_fovs_vary_in_cell_size_and_intensity():
    fovs = [simulate_fov(SMALL, "mito", seed=s) for s in range(4)]
    cells = [len(np.unique(f["masks"]["label"][f["masks"]["cell"]])) for f in fovs]
    dna_peak = [float(np.percentile(_signal(f, "dna"), 99.9)) for f in fovs]
    assert max(cells) > min(cells)
    assert max(dna_peak) > 1.15 * min(dna_peak)


@pytest.mark.parametrize("bad,match", [
    (dict(shape=(16, 64, 64)), "needs Z >="),
    (dict(shape=(32, 64)), "shape must be"),
    (dict(pixel_size=(0.5, 0.0, 0.3)), "pixel_size"),
    (dict(cell_diameter=(12.0, 8.0)), "cell_diameter"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(SimConfig(), **bad)


def test_unknown_structure_is_named():
    with pytest.raises(ValueError, match="'golgi'.*mito"):
        simulate_fov(SMALL, "golgi", seed=0)


# ----------------------------------------------------------------------------------------------
# the cell model: focus range, compartments


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_focus_range_inside_the_stack_with_empty_margins(seed):
    cfg = SimConfig()  # the quick geometry: the layer must fit a 16-slice focus window
    f = simulate_fov(cfg, "envelope", seed)
    lo, hi, nz = f["focus_z_lo"], f["focus_z_hi"], cfg.shape[0]
    assert cfg.margin_slices <= lo < hi <= nz - cfg.margin_slices
    assert hi - lo <= int(np.ceil(cfg.tallest_um / cfg.pixel_size[0])) + 1
    assert f["masks"]["cell"][lo:hi].any(axis=(1, 2)).all()
    assert not f["masks"]["cell"][:lo].any() and not f["masks"]["cell"][hi:].any()
    dna = _signal(f, "dna")  # margins beyond the PSF's reach are empty
    assert dna[: lo - 2].max() < 0.01 * dna.max() and dna[hi + 2:].max() < 0.01 * dna.max()


def test_dna_and_nucleoli_inside_nuclei(fov):
    nucleus = fov["masks"]["nucleus"]
    near_nucleus = ndimage.binary_dilation(nucleus, iterations=2)
    for name in ("dna", "nucleoli"):
        s = _signal(fov, name)
        assert s[near_nucleus].sum() > 0.98 * s.sum(), name
    # DNA is lower inside nucleoli
    dna, nl = _signal(fov, "dna"), _signal(fov, "nucleoli")
    inside = nucleus & (nl > 0.5 * nl.max())
    assert dna[inside].mean() < 0.8 * dna[nucleus & (nl < 0.05 * nl.max())].mean()


def test_mito_in_cytoplasm_not_nucleus(fov):
    cell, nucleus = fov["masks"]["cell"], fov["masks"]["nucleus"]
    core = ndimage.binary_erosion(nucleus, iterations=2)
    cytoplasm = ndimage.binary_erosion(cell & ~ndimage.binary_dilation(nucleus, iterations=2))
    mito = _signal(fov, "mito")
    assert mito[core].mean() < 0.05 * mito[cytoplasm].mean()
    assert mito[ndimage.binary_dilation(cell, iterations=2)].sum() > 0.98 * mito.sum()


def test_envelope_at_the_nuclear_boundary(fov):
    nucleus = fov["masks"]["nucleus"]
    shell = ndimage.binary_dilation(nucleus) & ~ndimage.binary_erosion(nucleus)
    core = ndimage.binary_erosion(nucleus, iterations=3)
    away = ndimage.binary_erosion(fov["masks"]["cell"] & ~ndimage.binary_dilation(nucleus, iterations=3))
    env = _signal(fov, "envelope")
    assert env[shell].mean() > 3 * env[core].mean()
    assert env[shell].mean() > 20 * env[away].mean()


def test_actomyosin_near_membrane_and_basal(fov):
    label, cell = fov["masks"]["label"], fov["masks"]["cell"]
    edge = ndimage.maximum_filter(label, 3) != ndimage.minimum_filter(label, 3)
    near = np.broadcast_to(ndimage.binary_dilation(edge, iterations=2), cell.shape)
    acto = _signal(fov, "actomyosin")
    assert acto[cell & near].mean() > 5 * acto[cell & ~near].mean()
    lo, hi = fov["focus_z_lo"], fov["focus_z_hi"]
    mid = (lo + hi) // 2
    assert acto[lo:mid][cell[lo:mid]].mean() > 1.5 * acto[mid:hi][cell[mid:hi]].mean()
    membrane = _signal(fov, "membrane")
    assert membrane[cell & near].mean() > 2 * membrane[cell & ~near].mean()


# ----------------------------------------------------------------------------------------------
# optics


@pytest.mark.parametrize("sigma", [(0.4, 0.7, 1.3), (1.2, 0.5, 0.5), (2.0, 1.0, 1.5)])
def test_psf_is_normalised_and_anisotropic(sigma):
    k = optics.gaussian_psf(sigma)
    assert all(s % 2 == 1 for s in k.shape)
    assert abs(k.sum() - 1) < 1e-5
    centre = np.array(k.shape) // 2
    assert np.unravel_index(k.argmax(), k.shape) == tuple(centre)
    blurred = optics.blur(np.pad(np.ones((1, 1, 1), np.float32), 10), (2 * sigma[0],) * 3, (2.0, 1.0, 1.0))
    assert abs(blurred.sum() - 1) < 1e-4


def test_widefield_psf_sigmas():
    sz, sxy = optics.widefield_psf_sigmas(0.52, 1.25, 1.33)
    assert sxy == pytest.approx(0.0874, abs=1e-3) and sz / sxy > 3
    with pytest.raises(ValueError, match="numerical aperture"):
        optics.widefield_psf_sigmas(0.52, 1.4, 1.33)


def test_camera_is_poisson_gaussian():
    rng = np.random.default_rng(0)
    img = optics.camera(np.full((200, 300), 50.0), rng, gain=2.0, offset=100, read_noise=3.0)
    assert img.dtype == np.uint16
    assert img.mean() == pytest.approx(2 * 50 + 100, rel=0.01)
    assert img.var() == pytest.approx(4 * 50 + 9 + 1 / 12, rel=0.05)


def test_brightfield_of_a_thin_phase_disk_inverts_through_focus():
    """A thin phase-only disk at slice 12: no contrast in focus, opposite contrast above and below."""
    shape, px = (25, 48, 48), (0.5, 0.3, 0.3)
    yy, xx = np.mgrid[:48, :48]
    phase = np.zeros(shape, np.float32)
    phase[12] = 0.05 * ndimage.gaussian_filter(((yy - 24) ** 2 + (xx - 24) ** 2 < 25).astype(np.float32), 1)
    img = optics.brightfield_stack(phase, np.zeros_like(phase), px) - 1
    centre = img[:, 22:27, 22:27].mean(axis=(1, 2))
    contrast = img.std(axis=(1, 2))
    assert contrast[12] < 1e-4 < contrast[10] and contrast[12] < 0.05 * contrast[14]
    assert np.sign(centre[8]) == -np.sign(centre[16]) != 0
    # an absorbing disk is dark in focus and does not invert: the same above and below
    dark = optics.brightfield_stack(np.zeros_like(phase), phase, px) - 1
    assert dark[12, 24, 24] < 0 and (dark[:, 24, 24] < 0).all()
    np.testing.assert_allclose(dark[:12], dark[13:][::-1], atol=1e-5)


def test_simulated_brightfield_inverts_through_focus_and_is_flattest_in_the_layer():
    for seed in (0, 1, 3):
        f = simulate_fov(SimConfig(), "nucleoli", seed)
        lo, hi = f["focus_z_lo"], f["focus_z_hi"]
        bf = f["brightfield"].astype(np.float32)
        rel = bf / ndimage.gaussian_filter(bf, (0, 12, 12)) - 1  # flat-field: remove the illumination
        over_nuclei = np.array([r[f["masks"]["nucleus"].any(0)].mean() for r in rel])
        assert np.sign(over_nuclei[lo - 2]) == -np.sign(over_nuclei[hi + 1]) != 0
        band = ndimage.gaussian_filter(rel, (0, 2, 2)) - ndimage.gaussian_filter(rel, (0, 8, 8))
        contrast = band.std(axis=(1, 2))
        # the flattest plane of the layer is a dip, at least 10 % below the contrast within 6 slices
        # (3.6 µm) on either side: a phase object is flattest in focus (far from focus, blur lowers
        # the contrast again, so the comparison stays near the dip)
        z = lo + int(contrast[lo:hi].argmin())
        assert contrast[z] < 0.9 * contrast[z - 6:z].max() and contrast[z] < 0.9 * contrast[z + 1:z + 7].max(), seed


def test_brightfield_is_not_a_linear_mix_of_the_fluorescence(fov):
    lo, hi = fov["focus_z_lo"], fov["focus_z_hi"]
    x = np.concatenate([fov["truth"][:, lo:hi].reshape(6, -1).T, np.ones(((hi - lo) * 70 * 83, 1))], 1)
    y = fov["brightfield"][lo:hi].ravel().astype(np.float64)
    residual = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    assert 1 - residual.var() / y.var() < 0.3


# ----------------------------------------------------------------------------------------------
# the Allen layout in a local quilt3 registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    out = tmp_path_factory.mktemp("registry")
    cfg = SimConfig(shape=(32, 40, 44))
    return out, cfg, write_registry(out, 1, cfg, seed=7, structures=("mito", "nucleoli"))


def test_metadata_csv_follows_the_allen_layout(registry):
    out, cfg, uri = registry
    meta = pd.read_csv(out / ALLEN_PACKAGE / "metadata.csv")
    for col in ("CellId", "FOVId", "structure_name", "fov_path", "ChannelNumberBrightfield", "ChannelNumberStruct",
                "ChannelNumber405", "ChannelNumber638", "outlier", "truth_path", "focus_z_lo", "focus_z_hi"):
        assert col in meta.columns, col
    assert meta["CellId"].is_unique and meta["FOVId"].nunique() == 2 and len(meta) > 2  # one row per cell
    assert set(meta["structure_name"]) == {"TOMM20", "FBL"}
    assert meta["fov_path"].str.match(r"fov_path/.+\.ome\.tiff$").all()
    assert set(meta["outlier"]) <= {"Yes", "No"}
    fovs = meta.drop_duplicates("FOVId")
    assert fovs["ChannelNumberBrightfield"].nunique() == 2  # the channel order varies
    for _, row in fovs.iterrows():
        cols = ["ChannelNumberBrightfield", "ChannelNumberStruct", "ChannelNumber405", "ChannelNumber638"]
        assert sorted(row[cols]) == [0, 1, 2, 3]
        assert 0 <= row["focus_z_lo"] < row["focus_z_hi"] <= cfg.shape[0]


def test_ome_files_carry_names_and_pixel_sizes(registry):
    out, cfg, _ = registry
    meta = pd.read_csv(out / ALLEN_PACKAGE / "metadata.csv").drop_duplicates("FOVId")
    for _, row in meta.iterrows():
        with tifffile.TiffFile(out / ALLEN_PACKAGE / row["fov_path"]) as tif:
            vol = tif.series[0].asarray()
            pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert vol.shape == (4, *cfg.shape) and vol.dtype == np.uint16
        for ax, size in zip("ZYX", cfg.pixel_size):
            assert float(pixels[f"PhysicalSize{ax}"]) == pytest.approx(size)
            assert pixels[f"PhysicalSize{ax}Unit"] == "µm"
        names = [c["Name"] for c in pixels["Channel"]]
        assert names[int(row["ChannelNumberBrightfield"])] == CHANNEL_NAMES["brightfield"]
        assert names[int(row["ChannelNumber405"])] == CHANNEL_NAMES["dna"]
        bf = vol[int(row["ChannelNumberBrightfield"])].astype(float)
        assert bf.mean() > 5 * vol[int(row["ChannelNumber405"])].mean()  # brightfield is bright
        truth = tifffile.imread(out / ALLEN_PACKAGE / row["truth_path"])
        assert truth.shape == (6, *cfg.shape) and truth.dtype == np.float32


def test_registry_browses_offline(registry):
    from vstain.data.allen import _quilt3

    _, _, uri = registry
    assert uri.startswith("file://")
    pkg = _quilt3().Package.browse(ALLEN_PACKAGE, registry=uri)
    keys = set(pkg.keys())
    assert {"metadata.csv", "fov_path", "truth_path"} <= keys
    meta = pkg["metadata.csv"].deserialize()
    assert all(k in pkg for k in meta["fov_path"])


def test_registry_rejects_unknown_structure(tmp_path):
    with pytest.raises(ValueError, match="golgi"):
        write_registry(tmp_path, 1, SimConfig(shape=(32, 32, 32)), structures=("golgi",))
    assert STRUCTURES == ("mito", "envelope", "actomyosin", "nucleoli")


def test_registry_is_the_same_from_worker_processes(tmp_path):
    cfg = SimConfig(shape=(32, 24, 28))
    one = write_registry(tmp_path / "one", 1, cfg, seed=3, structures=("mito", "nucleoli"), workers=1)
    two = write_registry(tmp_path / "two", 1, cfg, seed=3, structures=("mito", "nucleoli"), workers=2)
    assert one != two
    a, b = (pd.read_csv(tmp_path / d / ALLEN_PACKAGE / "metadata.csv") for d in ("one", "two"))
    pd.testing.assert_frame_equal(a, b)
    for key in a["fov_path"].unique():
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "one" / ALLEN_PACKAGE / key),
                                      tifffile.imread(tmp_path / "two" / ALLEN_PACKAGE / key))
