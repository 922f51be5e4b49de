"""The FOV stages hold one FOV at a time: Noise2Void reads its patches from disk (vstain.preprocess.denoise.DiskStack)
and the peak memory of stages 02, 03, the metrics and the classifier's scores does not grow with the
number of FOVs (tracemalloc, which counts numpy's arrays)."""
import pickle
import shutil
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from test_denoise import TINY, blobs, identity_n2v
from test_focus import write_stage01

from vstain.evaluate import classifier, metrics, patches, perceptual
from vstain.preprocess import denoise, stages
from vstain.volumes import write_volume


@pytest.fixture
def volume(tmp_path):
    vol = np.random.default_rng(0).normal(10, 2, (3, 13, 21, 19)).astype(np.float32)
    write_volume(tmp_path / "v.tif", vol)
    return tmp_path / "v.tif", vol


@pytest.mark.parametrize("channel,z_lo,z_hi,corner,size", [
    (1, 2, 11, (0, 5, 3), (4, 8, 16)),
    (2, 0, 13, (-2, 15, 10), (8, 8, 16)),  # runs past the window: zero-padded, as careamics pads
    (0, 12, 13, (0, 0, 0), (1, 21, 19)),
])
def test_disk_stack_reads_its_window(volume, channel, z_lo, z_hi, corner, size):
    path, vol = volume
    s = denoise.DiskStack(path, channel, z_lo, z_hi, "F7")
    window = vol[channel, z_lo:z_hi]
    assert s.shape == window.shape and s.data_shape == (1, 1, *window.shape)
    assert np.array_equal(s.read(), window)
    padded = np.pad(window, [(8, 16)] * 3)
    expected = padded[tuple(slice(8 + c, 8 + c + n) for c, n in zip(corner, size))]
    assert np.array_equal(s.extract_patch(0, None, corner, size), expected[None])


def test_disk_stack_rejects_what_it_cannot_stream(volume, tmp_path):
    path, vol = volume
    with pytest.raises(ValueError, match=r"no channel 3 with slices \[0, 4\)"):
        denoise.DiskStack(path, 3, 0, 4)
    with pytest.raises(ValueError, match=r"no channel 0 with slices \[5, 14\)"):
        denoise.DiskStack(path, 0, 5, 14)
    tifffile.imwrite(tmp_path / "zip.tif", vol, compression="zlib")
    with pytest.raises(ValueError, match="zip.tif: cannot be read patch by patch"):
        denoise.DiskStack(tmp_path / "zip.tif", 0, 0, 4)
    with pytest.raises(ValueError, match=r"stack 0 \(F2\) holds NaN"):
        vol[1, 3, 4, 5] = np.nan
        write_volume(tmp_path / "nan.tif", vol)
        denoise.train_n2v([denoise.DiskStack(tmp_path / "nan.tif", 1, 0, 13, "F2")], "dna", tmp_path / "n2v",
                          denoise.N2VConfig(**TINY))


def test_n2v_trains_on_disk_stacks_as_on_arrays(tmp_path, monkeypatch):
    """Same patches, same model, same output; the stacks are read whole once each (to check and
    hash them, one at a time), the training reads patches."""
    arrays = [blobs((9, 21, 19), 0)[1], blobs((11, 17, 23), 1)[1]]
    vols = [np.stack([np.zeros_like(a), a]) for a in arrays]
    for i, v in enumerate(vols):
        write_volume(tmp_path / f"{i}.tif", np.pad(v, [(0, 0), (2, 1), (0, 0), (0, 0)]))
    stacks = [denoise.DiskStack(tmp_path / f"{i}.tif", 1, 2, 2 + a.shape[0], str(i)) for i, a in enumerate(arrays)]
    calls = {"read": 0, "patch": 0}
    read, patch = denoise.DiskStack.read, denoise.DiskStack.extract_patch

    def counted_read(self):
        calls["read"] += 1
        return read(self)

    def counted_patch(self, *a, **kw):
        calls["patch"] += 1
        return patch(self, *a, **kw)

    monkeypatch.setattr(denoise.DiskStack, "read", counted_read)
    monkeypatch.setattr(denoise.DiskStack, "extract_patch", counted_patch)
    cfg = denoise.N2VConfig(**TINY)
    on_disk = denoise.train_n2v(stacks, "mito", tmp_path / "disk", cfg)
    assert calls["read"] == len(stacks) and calls["patch"] >= cfg.batch_size * cfg.steps_per_epoch
    in_memory = denoise.train_n2v(arrays, "mito", tmp_path / "memory", cfg)
    assert [r["train_loss_step"] for r in on_disk.losses] == [r["train_loss_step"] for r in in_memory.losses]
    for s, a in zip(stacks, arrays):
        assert np.array_equal(on_disk.denoise(s), in_memory.denoise(a))


# ------------------------------------------------------------------- peak memory, N and 2N FOVs

FOV_SHAPE, WINDOW = (32, 64, 64), 12
FOV_BYTES = 7 * np.prod(FOV_SHAPE) * 4  # one [7, Z, Y, X] float32 FOV file


def _replicate(src, dst, copies):
    """A 01_data stage of ``copies`` copies of every FOV of ``src`` under new ids."""
    fovs = pd.read_csv(src / "fovs.csv", dtype={"fov_id": str})
    rows = []
    for k in range(copies):
        for _, r in fovs.iterrows():
            r = r.copy()
            r["fov_id"] = f"{r['fov_id']}c{k}"
            for col, sub in (("path", "fovs"), ("truth_path", "truth")):
                (dst / sub).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / r[col], dst / sub / f"{r['fov_id']}.tif")
                r[col] = f"{sub}/{r['fov_id']}.tif"
            rows.append(r)
    pd.DataFrame(rows).to_csv(dst / "fovs.csv", index=False)
    return dst


def _peak(fn):
    """Peak bytes allocated (Python objects and numpy arrays) while ``fn`` runs, and its result."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        out = fn()
        return tracemalloc.get_traced_memory()[1] - start, out
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def peaks(tmp_path_factory):
    """Each stage's peak on 12 and on 24 FOVs (copies of 4 simulated ones), N2V replaced by the
    identity (its streaming is tested above; here the stage's own bookkeeping is measured)."""
    root = tmp_path_factory.mktemp("streaming")
    base = write_stage01(root / "base", n_per_structure=1, shape=FOV_SHAPE)
    cfg = classifier.ClassifierConfig(patch=(8, 16, 16), widen_factor=0.125, pool_per_class=16)
    out = {}
    # built (and MONAI imported) before any measurement: an import under tracemalloc is slow, and
    # its allocations would count in the first run's peak only
    clf = classifier.build_classifier(cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(denoise, "train_n2v", identity_n2v)
        for copies in (3, 6):
            d = root / f"x{copies}"
            _replicate(base, d / "01_data", copies)
            out["02_plls", copies] = _peak(lambda: stages.run_focus_stage(d / "01_data", d / "02_plls",
                                                                              window=WINDOW))[0]
            out["03_denoising", copies] = _peak(lambda: stages.run_denoise_stage(
                d / "01_data", d / "02_plls", d / "03", denoise.N2VConfig(**TINY), bm3d_max_volumes=0,
                nlm_max_volumes=0))[0]
            preds = d / "preds"
            preds.mkdir()
            for f in (d / "03" / "processed").glob("*_truth.tif"):
                shutil.copyfile(f, preds / f.name.replace("_truth", ""))
            out["metrics", copies] = _peak(lambda: metrics.evaluate_predictions(d / "03", {"m": preds}, "train"))[0]
            out["training_pool", copies] = _peak(lambda: patches.training_pool(d / "03", cfg))[0]
            out["score_models", copies] = _peak(lambda: perceptual.score_models(
                clf, cfg, d / "03", {"m": preds}, "train"))[0]
            peak, (_, cut) = _peak(lambda: patches.scoring_patches(d / "03", "train", cfg, {"m": preds}))
            out["scoring_patches", copies] = peak - 2 * sum(p.nbytes for p in cut.values())  # FOVs' + joined
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["02_plls", "03_denoising", "metrics", "training_pool", "score_models",
                                   "scoring_patches"])
def test_peak_memory_does_not_grow_with_the_number_of_fovs(peaks, stage):
    """12 more FOVs may add their table rows, not their volumes: less than one FOV file in all
    (scoring_patches: beyond the patches it returns, held twice while they are joined)."""
    small, large = peaks[stage, 3], peaks[stage, 6]
    assert small > FOV_BYTES / 4  # the measurement sees the stage's arrays
    assert large - small < FOV_BYTES, f"{stage}: peak {small / 2**20:.1f} MiB on 12 FOVs, {large / 2**20:.1f} on 24"


def test_processed_crops_hold_no_volume_between_crops(tmp_path):
    """Training crops are read from the files crop by crop: the dataset pickles to a few paths and
    shapes, and a crop is the file's box (Y/X flips off)."""
    from test_denoise import processed_records

    from vstain.preprocess.processed import ProcessedCrops, read_manifest, write_processed

    write_processed(tmp_path, processed_records(4, shape=(9, 33, 31)), seed=0)
    crops = ProcessedCrops(tmp_path, "train", crop=(5, 16, 8), samples=6, flips=False, seed=2)
    assert len(pickle.dumps(crops)) < 7 * 9 * 33 * 31 * 4  # less than one processed FOV
    vols = {r["fov_id"]: tifffile.imread(r["path"]) for _, r in read_manifest(tmp_path).iterrows()}
    for i in range(len(crops)):
        c = torch.cat(crops[i]).numpy()
        corners = [(v, z, a, b) for v in vols.values() for z, a, b in np.argwhere(v[0] == c[0, 0, 0, 0])]
        assert len(corners) == 1  # the brightfield voxel values are random, so the corner is unique
        v, z, a, b = corners[0]
        assert np.array_equal(c, v[:, z:z + 5, a:a + 16, b:b + 8], equal_nan=True)
