"""PLLS and the in-focus window (vstain.preprocess.focus)."""
import numpy as np
import pytest
from scipy import ndimage

from vstain.preprocess import focus


def power_law_noise(shape, a, seed):
    """2D noise whose power spectrum falls as 1/f**a."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0
    amp = f ** (-a / 2)
    amp[0, 0] = 0.0
    return np.real(np.fft.ifft2(amp * np.fft.fft2(rng.standard_normal(shape))))


@pytest.mark.parametrize("a", [0.0, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("shape", [(63, 97), (128, 128), (45, 200)])
def test_plls_recovers_power_law_exponent(a, shape):
    slopes = [focus.plls(power_law_noise(shape, a, seed)) for seed in range(3)]
    assert abs(np.mean(slopes) + a) < 0.15


def test_plls_band_and_scale_invariance():
    img = power_law_noise((96, 80), 2.0, 0)
    assert focus.plls(img) == pytest.approx(focus.plls(7 * img + 100), abs=1e-9)
    assert abs(focus.plls(img, band=(0.05, 0.25)) + 2.0) < 0.25
    with pytest.raises(ValueError, match="band"):
        focus.plls(img, band=(0.3, 0.1))


def test_radial_power_spectrum_frequencies():
    f, p = focus.radial_power_spectrum(np.random.default_rng(0).standard_normal((33, 50)))
    assert f[0] == pytest.approx(1 / 33) and f[-1] <= 0.5 and len(f) == len(p) == 16
    assert np.all(p > 0)


@pytest.mark.parametrize("blank", [np.zeros((31, 37)), np.full((31, 37), 5.0), np.full((31, 37), np.nan)])
def test_blank_slices_give_finite_measures(blank):
    assert focus.plls(blank) == 0.0
    assert focus.normalized_variance(blank) == 0.0
    assert focus.brenner(blank) == 0.0


def defocus_stack(n_z=41, shape=(64, 72), center=23, noise=True, seed=0):
    """Spots blurred more the further a slice is from `center`, on a background, with Poisson noise."""
    rng = np.random.default_rng(seed)
    obj = np.zeros(shape)
    obj[tuple(rng.integers(4, min(shape) - 4, (2, 40)))] = 60.0
    obj = ndimage.gaussian_filter(obj, 1.0)
    stack = np.stack([ndimage.gaussian_filter(obj, 0.5 + 0.35 * abs(z - center)) for z in range(n_z)])
    stack = stack * 20 + 10
    return rng.poisson(stack).astype(np.float32) if noise else stack.astype(np.float32)


@pytest.mark.parametrize("method", ["plls", "nvar", "brenner"])
@pytest.mark.parametrize("n_z,center,window", [(41, 23, 16), (37, 9, 11), (29, 25, 8)])
def test_focus_center_finds_the_sharpest_slice(method, n_z, center, window):
    stack = defocus_stack(n_z=n_z, center=center)
    r = focus.focus_center(stack, method=method, window=window)
    assert abs(r.center - center) <= 1
    assert r.z_hi - r.z_lo == window and 0 <= r.z_lo and r.z_hi <= n_z
    assert r.z_lo <= r.center < r.z_hi
    assert np.isfinite(r.curve).all() and r.curve.shape == (n_z,)


def test_auto_extremum_follows_the_data():
    # with noise, PLLS is steepest (most negative) in focus here, as the thesis found
    stack = defocus_stack()
    auto = focus.focus_center(stack, "plls", window=16)
    assert auto.extremum == "min" and auto.contrast_min > auto.contrast_max
    forced = focus.focus_center(stack, "plls", extremum="max", window=16)
    assert abs(forced.center - 23) > 3


def test_blank_slices_are_never_focus():
    stack = defocus_stack(n_z=31, center=15)
    stack[:6] = 0.0
    stack[-3:] = np.nan
    for method in focus.METHODS:
        r = focus.focus_center(stack, method=method, window=16)
        assert abs(r.center - 15) <= 1 and np.isfinite(r.curve).all()
    with pytest.raises(ValueError, match="blank"):
        focus.focus_center(np.zeros((20, 16, 16)), window=8, fov_id="F1")


@pytest.mark.parametrize("center,n_z,window,expected", [(0, 40, 16, (0, 16)), (39, 40, 16, (24, 40)),
                                                        (20, 40, 16, (12, 28)), (5, 11, 11, (0, 11)),
                                                        (7, 13, 5, (5, 10))])
def test_focus_window_is_clipped_into_the_stack(center, n_z, window, expected):
    assert focus.focus_window(center, n_z, window) == expected


def test_short_stack_error_names_fov_and_sizes():
    with pytest.raises(ValueError, match=r"FOV abc.*12 z-slices.*window of 32"):
        focus.focus_center(np.random.rand(12, 20, 20), window=32, fov_id="abc")
    with pytest.raises(ValueError, match="extremum"):
        focus.focus_center(np.random.rand(12, 20, 20), window=4, extremum="steepest")


def write_stage01(folder, n_per_structure=3, shape=(32, 40, 44), seed=0):
    """A tiny 01_data stage from the simulator, in the contract's layout."""
    from vstain.channels import DEFAULT_GENE_MAP, TARGETS
    from vstain.data import simulate
    from vstain.volumes import write_volume

    genes = {s: g for g, s in reversed(list(DEFAULT_GENE_MAP.items()))}
    cfg = simulate.SimConfig(shape=shape)
    rows, i = [], 0
    for s in simulate.STRUCTURES:
        for _ in range(n_per_structure):
            f = simulate.simulate_fov(cfg, s, seed * 1000 + i)
            vol = np.full((1 + len(TARGETS), *shape), np.nan, np.float32)
            vol[0] = f["brightfield"]
            for key, name in (("dna", "dna"), ("membrane", "membrane"), ("struct", s)):
                vol[1 + TARGETS.index(name)] = f[key]
            write_volume(folder / f"fovs/{i}.tif", vol)
            write_volume(folder / f"truth/{i}.tif", f["truth"])
            rows.append({"fov_id": str(i), "gene": genes[s], "structure": s, "path": f"fovs/{i}.tif",
                         "truth_path": f"truth/{i}.tif", "focus_z_lo": f["focus_z_lo"], "focus_z_hi": f["focus_z_hi"],
                         "pixel_size_z": cfg.pixel_size[0], "pixel_size_y": cfg.pixel_size[1],
                         "pixel_size_x": cfg.pixel_size[2]})
            i += 1
    import pandas as pd

    pd.DataFrame(rows).to_csv(folder / "fovs.csv", index=False)
    return folder


@pytest.mark.parametrize("shape,window", [((32, 40, 44), 18), ((34, 48, 36), 20)])
def test_focus_stage_finds_the_true_range_on_simulated_fovs(tmp_path, shape, window):
    from vstain.preprocess import stages

    stage01 = write_stage01(tmp_path / "01_data", n_per_structure=1, shape=shape)
    df = stages.run_focus_stage(stage01, tmp_path / "02_plls", window=window)
    assert (tmp_path / "02_plls" / "focus.csv").exists() and (tmp_path / "02_plls" / "focus_curves.csv").exists()
    assert (df["z_hi"] - df["z_lo"] == window).all()
    assert (df["extremum_plls"] == "min").all()  # noisy simulated DNA: steepest slope in focus
    errors = stages.focus_errors(df).set_index("method")
    assert errors.loc["plls", "max_abs_error"] <= 2 and errors.loc["nvar", "max_abs_error"] <= 2
    assert (df["overlap"] >= 0.9).all()
    with pytest.raises(ValueError, match="FOV 0: the stack has"):
        stages.run_focus_stage(stage01, tmp_path / "short", window=shape[0] + 1)


@pytest.mark.parametrize("n_z, center, rng, offset, expected", [
    (48, 20, (10, 32), 6, (37, 6)),    # more room above: 6 slices past the last in-focus one
    (48, 30, (20, 45), 6, (14, 6)),    # more room below
    (40, 20, (10, 38), 6, (4, 6)),     # more room below
    (33, 20, (2, 31), 6, (32, 2)),     # the stack ends first: as far as it goes
    (30, 25, None, 6, (19, 6)),        # no true range: from the centre
])
def test_defocused_slice_lies_outside_the_true_range(n_z, center, rng, offset, expected):
    z, d = focus.defocused_slice(n_z, center, rng, offset)
    assert (z, d) == expected
    if rng is not None:
        assert not rng[0] <= z < rng[1]


def test_defocused_slice_needs_an_out_of_focus_slice():
    with pytest.raises(ValueError, match="fills the whole stack"):
        focus.defocused_slice(20, 10, (0, 20), 3)
