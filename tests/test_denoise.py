"""Noise2Void through careamics (vstain.preprocess.denoise), the BM3D and NLM baselines and the scores
(vstain.preprocess.classical), and the processed set."""
import os

import numpy as np
import pandas as pd
import pytest

from vstain.channels import TARGETS
from vstain.evaluate import denoising
from vstain.preprocess import classical, denoise, stages
from vstain.preprocess.processed import ProcessedCrops, load_fov, read_manifest, write_processed

TINY = dict(patch_size=(8, 16, 16), batch_size=4, epochs=1, steps_per_epoch=3, base_width=8,
            n_val_patches=2, tile_size=(8, 16, 16), tile_overlap=(2, 4, 4))


def blobs(shape, seed):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    clean = np.zeros(shape)
    for _ in range(4):
        c = [rng.uniform(0, s) for s in shape]
        clean += 30 * np.exp(-((z - c[0]) ** 2 / 8 + (y - c[1]) ** 2 / 20 + (x - c[2]) ** 2 / 20))
    clean = clean.astype(np.float32) + 5
    return clean, rng.poisson(clean).astype(np.float32)


def test_n2v_smoke_train_predict_and_reuse(tmp_path):
    cfg = denoise.N2VConfig(**TINY)
    shapes = [(9, 21, 19), (9, 21, 19)]
    stacks = [blobs(s, i)[1] for i, s in enumerate(shapes)]
    model, denoised = denoise.train_and_denoise(stacks, "mito", tmp_path / "mito", cfg)
    assert not model.reused and model.train_s > 0
    assert [d.shape for d in denoised] == shapes
    assert all(np.isfinite(d).all() and d.dtype == np.float32 for d in denoised)
    assert (tmp_path / "mito" / "model.ckpt").exists() and model.losses
    again, again_denoised = denoise.train_and_denoise(stacks, "mito", tmp_path / "mito", cfg)
    assert again.reused and again.train_s == pytest.approx(model.train_s, abs=0.01)
    assert np.allclose(again_denoised[0], denoised[0], atol=1e-5)
    changed = denoise.train_n2v(stacks, "mito", tmp_path / "mito", denoise.N2VConfig(**{**TINY, "seed": 3}))
    assert not changed.reused


def test_n2v_failure_names_channel_and_cause(tmp_path, monkeypatch):
    import careamics

    def fail(self, **kw):
        raise ValueError("simulated out-of-memory")

    monkeypatch.setattr(careamics.CAREamist, "train", fail)
    with pytest.raises(RuntimeError, match=r"channel 'envelope'.*ValueError: simulated out-of-memory.*train.log"):
        denoise.train_and_denoise([blobs((8, 16, 16), 0)[1]], "envelope", tmp_path / "env", denoise.N2VConfig(**TINY))


@pytest.mark.parametrize("bad,match", [
    ([np.full((9, 20, 20), np.nan, np.float32)], "NaN"),
    ([np.zeros((4, 20, 20), np.float32)], "patch_size"),
    ([], "no stack"),
])
def test_n2v_rejects_bad_stacks_before_careamics(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        denoise.train_and_denoise(bad, "dna", tmp_path / "dna", denoise.N2VConfig(**TINY))


@pytest.mark.parametrize("kw,match", [
    (dict(patch_size=(8, 24, 24)), "powers of 2"), (dict(patch_size=(8, 16, 32)), "Y == X"),
    (dict(tile_overlap=(3, 4, 4)), "even"), (dict(tile_overlap=(8, 4, 4), tile_size=(8, 16, 16)), "< tile_size"),
    (dict(epochs=0), "epochs"),
])
def test_n2v_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        denoise.N2VConfig(**{**TINY, **kw})


@pytest.mark.parametrize("sigma", [0.5, 2.0, 7.0])
def test_noise_sigma_estimate(sigma):
    noise = np.random.default_rng(1).normal(0, sigma, (5, 47, 66))
    assert classical.estimate_noise_sigma(noise + 100) == pytest.approx(sigma, rel=0.05)


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_nlm_improves_psnr_and_ssim(mode):
    clean, noisy = blobs((9, 33, 35), 2)
    den = classical.nlm_denoise(noisy, mode=mode)
    assert den.shape == noisy.shape and den.dtype == np.float32
    before, after = classical.score(noisy, clean), classical.score(den, clean)
    assert after["psnr"] > before["psnr"] + 3 and after["ssim"] > before["ssim"]


@pytest.mark.parametrize("mode,shape", [("2d", (3, 24, 26)), ("3d", (8, 24, 26))])
def test_bm3d_lowers_the_error_of_a_noisy_smooth_volume(mode, shape):
    clean, noisy = blobs(shape, 4)
    den = classical.bm3d_denoise(noisy, mode=mode)
    assert den.shape == noisy.shape and den.dtype == np.float32
    assert np.mean((den - clean) ** 2) < 0.5 * np.mean((noisy - clean) ** 2)
    before, after = classical.score(noisy, clean), classical.score(den, clean)
    assert after["psnr"] > before["psnr"] + 3 and after["ssim"] > before["ssim"]


def test_slices_denoised_in_threads_equal_one_after_another(monkeypatch):
    """BM3D and NLM run the slices of a stack in as many threads as OMP_NUM_THREADS gives (the
    process's share of the cores), with the same output as one slice after another."""
    _, noisy = blobs((4, 24, 26), 5)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert classical.slice_threads() == 3
    threaded = [classical.bm3d_denoise(noisy), classical.nlm_denoise(noisy)]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert classical.slice_threads() == 1
    serial = [classical.bm3d_denoise(noisy), classical.nlm_denoise(noisy)]
    for a, b in zip(threaded, serial):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setenv("OMP_NUM_THREADS", "2,1")  # OpenMP's nested form: the outer level counts
    assert classical.slice_threads() == 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for unset in ("0", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert classical.slice_threads() == cores  # not a thread count: the cores this process may use
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert classical.slice_threads() == cores


def test_bm3d_bad_input():
    flat = np.full((2, 16, 16), 7.0, np.float32)
    assert np.array_equal(classical.bm3d_denoise(flat), flat)  # zero noise: nothing to remove, no NaN
    with pytest.raises(ValueError, match="at least"):
        classical.bm3d_denoise(np.zeros((2, 6, 16), np.float32))
    with pytest.raises(ValueError, match="at least"):
        classical.bm3d_denoise(np.zeros((4, 16, 16), np.float32), mode="3d")
    with pytest.raises(ValueError, match="NaN"):
        classical.bm3d_denoise(np.full((2, 16, 16), np.nan, np.float32))
    with pytest.raises(ValueError, match="mode"):
        classical.bm3d_denoise(flat, mode="4d")


class IdentityN2V:
    """A stand-in for a trained N2V model that returns its input."""

    def __init__(self, channel):
        self.channel, self.reused, self.train_s = channel, False, 1.0

    def denoise(self, stack):
        return np.array(stack, dtype=np.float32)


def identity_n2v(stacks, channel, work_dir, cfg, device="cpu", precision="32-true"):
    assert all(isinstance(s, denoise.DiskStack) for s in stacks)  # the stage hands careamics files, not arrays
    return IdentityN2V(channel)


@pytest.mark.parametrize("cap", [0, 1])
def test_denoise_stage_caps_bm3d_volumes(tmp_path, monkeypatch, cap):
    """``bm3d_max_volumes`` bounds BM3D's volumes per channel (N2V faked: this tests the bookkeeping)."""
    from test_focus import write_stage01

    monkeypatch.setattr(denoise, "train_n2v", identity_n2v)
    monkeypatch.setattr(stages.classical, "bm3d_denoise", lambda s, mode="2d": s * 0.5)  # BM3D itself: tested above
    stage01 = write_stage01(tmp_path / "01_data", n_per_structure=3, shape=(32, 24, 24))
    stages.run_focus_stage(stage01, tmp_path / "02_plls", window=4)
    out = tmp_path / "03_denoising"
    res = stages.run_denoise_stage(stage01, tmp_path / "02_plls", out, denoise.N2VConfig(**TINY),
                                       bm3d_max_volumes=cap, nlm_max_volumes=1)
    ev, tm = res["eval"], res["time"]
    per_channel = ev[ev["method"] == "bm3d"].groupby("channel").size()
    carried = ev[ev["method"] == "noisy"].groupby("channel").size()  # dna, membrane: 12 FOVs; the rest 3
    assert (per_channel.reindex(carried.index, fill_value=0) == carried.clip(upper=cap)).all()
    bm = tm[tm["method"] == "bm3d"].set_index("channel")
    assert len(bm) == (len(carried) if cap else 0) and (bm["n_volumes"] <= cap).all()
    assert (tm[tm["method"] == "nlm"]["n_volumes"] == 1).all()
    gallery = stages.read_volume(out / stages.GALLERY_TIF)
    assert gallery.shape[1] == len(stages.GALLERY_METHODS)
    j = stages.GALLERY_METHODS.index("bm3d")
    assert np.isfinite(gallery[:, j]).any() == bool(cap)
    summary = denoising.denoise_summary(ev, tm)
    claim = denoising.thesis_claim(summary, ev)
    assert ("BM3D" in claim) and (("cannot be checked" in claim) == (cap == 0))
    with pytest.raises(ValueError, match="bm3d_max_volumes"):
        stages.run_denoise_stage(stage01, tmp_path / "02_plls", out, denoise.N2VConfig(**TINY),
                                     bm3d_max_volumes=-1)


def test_score_is_affine_invariant_and_perfect_on_truth():
    clean, noisy = blobs((9, 21, 23), 3)
    assert classical.score(3 * noisy - 7, clean)["psnr"] == pytest.approx(classical.score(noisy, clean)["psnr"], abs=1e-6)
    perfect = classical.score(clean * 2 + 1, clean)
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["psnr"] > 100


def test_blind_spot_mask_replaces_selected_pixels_only():
    patch = np.arange(40 * 44, dtype=np.float32).reshape(40, 44)  # all values distinct
    masked, mask = denoise.blind_spot_mask(patch, masked_pixel_percentage=2.0, roi_size=5, seed=0)
    assert mask.shape == patch.shape and 0 < mask.sum() < patch.size * 0.05
    changed = masked != patch
    assert not changed[~mask].any()  # nothing outside the mask moves
    assert changed[mask].mean() > 0.9  # a masked pixel shows a neighbour's value, almost never its own


def test_receptive_field_covers_a_neighbourhood():
    rf = denoise.receptive_field(denoise.N2VConfig(**{**TINY, "depth": 1}), (16, 32, 32))
    assert rf.shape == (16, 32, 32) and rf[8, 16, 16] > 0
    covered = rf[8] > 0
    assert 9 < covered.sum() < 32 * 32  # more than a 3x3 kernel, less than the whole slice


def processed_records(n_per_structure=3, shape=(7, 13, 11), seed=0):
    rng = np.random.default_rng(seed)
    genes = {"mito": "TOMM20", "envelope": "LMNB1", "actomyosin": "MYH10", "nucleoli": "FBL"}
    records = []
    for s, gene in genes.items():
        for i in range(n_per_structure):
            tgt = np.full((len(TARGETS), *shape), np.nan, np.float32)
            for c in ("dna", "membrane", s):
                tgt[TARGETS.index(c)] = rng.normal(10, 2, shape)
            records.append({"fov_id": f"{s}{i}", "gene": gene, "structure": s, "bf": rng.normal(0, 1, shape),
                            "target": tgt, "truth": rng.normal(0, 1, (len(TARGETS), *shape))})
    return records


@pytest.mark.parametrize("n_per_structure,seed", [(3, 0), (5, 1), (8, 7)])
def test_manifest_splits_disjoint_and_stratified(tmp_path, n_per_structure, seed):
    df = write_processed(tmp_path, processed_records(n_per_structure, seed=seed), seed=seed)
    assert df["fov_id"].is_unique and set(df["split"]) == {"train", "val", "test"}
    groups = [set(df.loc[df["split"] == s, "fov_id"]) for s in ("train", "val", "test")]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert pd.crosstab(df["structure"], df["split"]).min().min() >= 1
    again = write_processed(tmp_path / "again", processed_records(n_per_structure, seed=seed), seed=seed)
    assert (again["split"] == df["split"]).all()


def test_processed_set_with_an_entirely_nan_channel(tmp_path):
    records = processed_records()
    for r in records:
        r["target"][TARGETS.index("nucleoli")] = np.nan  # no FOV carries it
    write_processed(tmp_path, records, seed=0)
    row = read_manifest(tmp_path).iloc[0]
    bf, tgt, truth = load_fov(row)
    assert np.isnan(tgt[TARGETS.index("nucleoli")]).all()
    assert abs(np.nanmean(tgt[TARGETS.index("dna")])) < 1e-5 and abs(np.nanstd(bf) - 1) < 1e-3
    x, y = ProcessedCrops(tmp_path, "train", crop=(5, 8, 8), samples=2)[0]
    assert x.shape == (1, 5, 8, 8) and y.shape == (6, 5, 8, 8)


@pytest.mark.slow
def test_denoise_stage_end_to_end_on_simulated_fovs(tmp_path):
    from test_focus import write_stage01

    stage01 = write_stage01(tmp_path / "01_data", n_per_structure=3, shape=(32, 32, 36))
    stages.run_focus_stage(stage01, tmp_path / "02_plls", window=8)
    cfg = denoise.N2VConfig(**{**TINY, "tile_size": (8, 32, 32), "tile_overlap": (0, 8, 8)})
    out = tmp_path / "03_denoising"
    res = stages.run_denoise_stage(stage01, tmp_path / "02_plls", out, cfg, nlm_max_volumes=1)
    man = read_manifest(out)
    assert len(man) == 12 and pd.crosstab(man["structure"], man["split"]).min().min() >= 1
    bf, tgt, truth = load_fov(man.iloc[0])
    assert bf.shape == (1, 8, 32, 36) and tgt.shape == (6, 8, 32, 36) and truth.shape == (6, 8, 32, 36)
    carried = [not np.isnan(c).all() for c in tgt]
    assert sum(carried) == 3 and carried[0] and carried[1]
    ev = res["eval"]
    assert set(ev["method"]) == {"noisy", "n2v", "bm3d", "nlm"} and set(ev["channel"]) == set(TARGETS)
    assert ev[["psnr", "ssim"]].notna().all().all()
    assert (ev[ev["method"] == "nlm"].groupby("channel").size() == 1).all()
    assert (ev[ev["method"] == "bm3d"].groupby("channel").size() == 1).all()  # bm3d_max_volumes default 1
    summary = denoising.denoise_summary(ev, res["time"])
    claim = denoising.thesis_claim(summary, ev)
    assert "thesis' claim" in claim and "BM3D" in claim and "non-local means" in claim
    assert sorted(p.name for p in (out / "n2v").iterdir()) == sorted(TARGETS)
    # a second run reuses the Noise2Void models (the baselines, checked above, are skipped: BM3D
    # costs ~0.3 s of fixed set-up per slice)
    again = stages.run_denoise_stage(stage01, tmp_path / "02_plls", out, cfg, bm3d_max_volumes=0, nlm_max_volumes=0)
    assert again["time"].query("method == 'n2v'")["reused"].all()


def _eval_table(n, n2v_minus_base, n2v_minus_noisy=3.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for f in range(n):
        for c in ("dna", "nucleoli"):
            base = 30 + rng.normal()
            rows += [{"fov_id": str(f), "channel": c, "method": "noisy", "psnr": base - 5},
                     {"fov_id": str(f), "channel": c, "method": "bm3d", "psnr": base},
                     {"fov_id": str(f), "channel": c, "method": "n2v",
                      "psnr": base + n2v_minus_base + 0.05 * rng.normal()}]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("n, gap, verdict", [(8, 0.0, "holds"), (8, -3.0, "does not hold"),
                                             (1, 0.0, "cannot be decided with n = 1 volume per channel")])
def test_channel_claims_decide_from_paired_intervals(n, gap, verdict):
    sentences, claim = denoising.channel_claims(_eval_table(n, gap))
    assert claim == verdict
    assert sentences[0].startswith("DNA: N2V ") and "against the noisy input" in sentences[0]
