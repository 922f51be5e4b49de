"""`python -m vstain predict`: channel choice by name or index, a batch with bad files, the
voxel-size warning and resampling, test-time augmentation, and the error for small stacks."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from vstain.__main__ import main
from vstain.channels import TARGETS
from vstain.inference import layerwise
from vstain.inference.infer import predict_volume
from vstain.inference.predict import (InputError, SimulatedTrainingWarning, load_model, parse_bytes, predict_file,
                                      predict_files, voxel_mismatch)
from vstain.models import Generator, GeneratorConfig
from vstain.preprocess.processed import zscore
from vstain.volumes import read_ome, write_ome

VOXEL = (0.5, 0.3, 0.3)


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Path:
    """A finished 04_unet stage (width 4, seeded) in a run directory whose 01_data says the voxel size."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    gen = Generator(GeneratorConfig(base_width=4))
    d = run / "04_unet"
    (d / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"generator.{k}": v for k, v in gen.state_dict().items()}}, d / "checkpoints" / "last.ckpt")
    (d / "model.json").write_text(json.dumps({"config": {}, "model": "unet", "generator": asdict(gen.cfg)}))
    (run / "01_data").mkdir()
    pd.DataFrame([{"fov_id": "a", "pixel_size_z": VOXEL[0], "pixel_size_y": VOXEL[1], "pixel_size_x": VOXEL[2]}]
                 ).to_csv(run / "01_data" / "fovs.csv", index=False)
    return d


def stack(shape=(11, 37, 42), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (1000 + 200 * rng.standard_normal(shape)).clip(0, 65535).astype(np.uint16)


def write_fov(path: Path, order=("dna", "brightfield", "struct"), voxel=VOXEL, shape=(11, 37, 42)) -> np.ndarray:
    names = {"dna": "H3342", "brightfield": "Bright", "struct": "EGFP"}
    vols = {c: stack(shape, i) for i, c in enumerate(order)}
    write_ome(path, np.stack([vols[c] for c in order]), [names[c] for c in order], voxel)
    return vols["brightfield"]


def expected(stage, bf):
    return predict_volume(load_model(stage).generator, zscore(bf[None].astype(np.float32)))


@pytest.mark.parametrize("channel", ["Bright", "bright", "1"])
def test_predict_picks_the_brightfield_of_another_channel_order(stage, tmp_path, channel):
    bf = write_fov(tmp_path / "fov.ome.tif")
    out = predict_file(load_model(stage), tmp_path / "fov.ome.tif", tmp_path / "out", channel=channel)
    pred, voxel, names = read_ome(out)
    assert names == list(TARGETS) and pred.dtype == np.float32 and pred.shape == (6, 11, 37, 42)
    assert voxel == pytest.approx(VOXEL)
    np.testing.assert_allclose(pred, expected(stage, bf), atol=1e-5)


def test_default_channel_is_the_one_named_bright(stage, tmp_path):
    bf = write_fov(tmp_path / "f.tif", order=("struct", "dna", "brightfield"))
    pred = read_ome(predict_file(load_model(stage), tmp_path / "f.tif", tmp_path / "o"))[0]
    np.testing.assert_allclose(pred, expected(stage, bf), atol=1e-5)


def test_unknown_channel_names_the_file_and_its_channels(stage, tmp_path):
    write_fov(tmp_path / "f.tif")
    with pytest.raises(InputError, match=r"f\.tif: no channel named 'phase'.*Bright"):
        predict_file(load_model(stage), tmp_path / "f.tif", tmp_path / "o", channel="phase")
    with pytest.raises(InputError, match=r"no channel 7: the file has 3"):
        predict_file(load_model(stage), tmp_path / "f.tif", tmp_path / "o", channel=7)


def test_a_folder_with_bad_files_predicts_the_rest_and_exits_non_zero(stage, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    write_fov(inp / "good1.ome.tif")
    write_fov(inp / "good2.tif", order=("brightfield", "dna", "struct"))
    (inp / "notes.txt").write_text("not an image")
    (inp / "broken.tif").write_bytes(b"II*\x00garbage")
    tifffile.imwrite(inp / "flat.tif", stack((37, 42)))
    write_fov(inp / "tiny.tif", shape=(5, 37, 42))
    rc = main(["predict", str(stage), str(inp), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tif")) == ["good1_vstain.ome.tif", "good2_vstain.ome.tif"]
    assert "4 of 6 input(s) could not be predicted" in err
    for bad, why in [("notes.txt", "not a TIFF"), ("broken.tif", "truncated or corrupt"), ("flat.tif", "no Z axis"),
                     ("tiny.tif", "smaller than the network allows")]:
        assert any(bad in line and why in line for line in err.splitlines()), (bad, err)


def test_voxel_size_warning_and_resampling(stage, tmp_path):
    write_fov(tmp_path / "f.tif", voxel=(1.0, 0.3, 0.31))
    assert voxel_mismatch((1.0, 0.3, 0.31), VOXEL) == ["z"]
    model = load_model(stage)
    with pytest.warns(UserWarning, match=r"differs from the training voxel size.*axis z.*--resample"):
        plain = read_ome(predict_file(model, tmp_path / "f.tif", tmp_path / "a"))[0]
    with pytest.warns(UserWarning, match="resampling to the training grid"):
        res = read_ome(predict_file(model, tmp_path / "f.tif", tmp_path / "b", do_resample=True))[0]
    assert plain.shape == res.shape == (6, 11, 37, 42)  # back on the input's grid
    assert not np.allclose(plain, res)


def test_tta_writes_mean_and_uncertainty_channels(stage, tmp_path):
    write_fov(tmp_path / "f.tif")
    out = predict_file(load_model(stage), tmp_path / "f.tif", tmp_path / "o", tta=True)
    pred, _, names = read_ome(out)
    assert pred.shape == (12, 11, 37, 42)
    assert names == [*TARGETS, *(f"{c}_std" for c in TARGETS)]
    assert (pred[6:] >= 0).all() and pred[6:].max() > 0


def test_focus_window_keeps_n_slices(stage, tmp_path):
    write_fov(tmp_path / "f.tif", shape=(20, 37, 42))
    out = predict_file(load_model(stage), tmp_path / "f.tif", tmp_path / "o", focus_window=8)
    assert read_ome(out)[0].shape == (6, 8, 37, 42)
    assert "focus_z_lo" in json.loads(out.with_name("f_vstain.json").read_text())
    # a window that starts at the first slice is recorded too
    write_fov(tmp_path / "g.tif", shape=(8, 37, 42))
    out = predict_file(load_model(stage), tmp_path / "g.tif", tmp_path / "o", focus_window=8)
    assert json.loads(out.with_name("g_vstain.json").read_text())["focus_z_lo"] == 0


def test_tiled_prediction_within_a_small_memory_budget(stage, tmp_path):
    """Over the budget the stack is predicted layer by layer through scratch files, which are
    removed afterwards, and the result is the one-pass prediction."""
    write_fov(tmp_path / "f.tif", shape=(16, 48, 48))
    model, scratch = load_model(stage), tmp_path / "scratch"
    (whole,), _ = predict_files(model, [tmp_path / "f.tif"], tmp_path / "whole", progress=False)
    with pytest.warns(UserWarning, match="layer by layer"):
        written, failed = predict_files(model, [tmp_path / "f.tif"], tmp_path / "o", max_memory="1MiB",
                                        progress=False, scratch=scratch)
    assert len(written) == 1 and not failed
    one, tiled = read_ome(whole)[0], read_ome(written[0])[0]
    np.testing.assert_allclose(tiled, one, rtol=0, atol=1e-5 * np.abs(one).max())
    assert scratch.is_dir() and list(scratch.iterdir()) == []
    rc = main(["predict", str(stage), str(tmp_path / "f.tif"), "-o", str(tmp_path / "cli"), "-q",
               "--max-memory", "1MiB", "--scratch", str(scratch)])
    assert rc == 0 and np.array_equal(read_ome(tmp_path / "cli" / "f_vstain.ome.tif")[0], tiled)


def test_a_stack_without_scratch_space_is_reported_and_the_batch_goes_on(stage, tmp_path, monkeypatch):
    write_fov(tmp_path / "big.tif", shape=(16, 48, 48))
    write_fov(tmp_path / "small.tif", shape=(8, 16, 16))  # fits the budget: no scratch files
    monkeypatch.setattr(layerwise.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    written, failed = predict_files(load_model(stage), [tmp_path / "big.tif", tmp_path / "small.tif"],
                                    tmp_path / "o", max_memory="1MiB", progress=False, scratch=tmp_path)
    assert [p.name for p in written] == ["small_vstain.ome.tif"]
    assert len(failed) == 1 and "big.tif" in failed[0][1] and "--scratch" in failed[0][1]


def test_bad_model_and_memory_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a model stage folder"):
        load_model(tmp_path)
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("512 MB") == 512 * 2**20 and parse_bytes(10) == 10
    with pytest.raises(ValueError, match="--max-memory"):
        parse_bytes("lots")


def test_a_model_trained_on_simulated_data_says_so_once_per_batch(stage, tmp_path):
    """`vstain predict` warns once, before the first file, when the model's run directory says its
    training FOVs were simulated; with no such record it says nothing of the kind."""
    run = tmp_path / "run"
    shutil.copytree(stage.parent, run)
    inp = tmp_path / "in"
    inp.mkdir()
    write_fov(inp / "a.tif")
    write_fov(inp / "b.tif")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["predict", str(run / "04_unet"), str(inp), "-o", str(tmp_path / "out0"), "-q"]) == 0
    assert not [w for w in seen if issubclass(w.category, SimulatedTrainingWarning)]
    (run / "01_data" / "manifest.json").write_text(json.dumps({"params": {"source": "synthetic"}}))
    r = subprocess.run([sys.executable, "-m", "vstain", "predict", str(run / "04_unet"), str(inp), "-o",
                        str(tmp_path / "out1"), "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("learned from simulated hiPSC colonies only") == 1, r.stderr
    assert "voxels of 0.5 x 0.3 x 0.3 µm" in r.stderr and "generator width 4" in r.stderr
    assert "not to be trusted" in r.stderr and len(list((tmp_path / "out1").glob("*.tif"))) == 2
