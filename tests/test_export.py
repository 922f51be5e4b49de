"""bioimage.io export (vstain.inference.export) and flip test-time augmentation (vstain.inference.tta).

A width-4 generator is saved as a model stage folder exactly as training leaves it (``model.json``
and ``checkpoints/last.ckpt`` with ``generator.*`` keys, ``01_data`` with the voxel size), exported
once with the network blocked, and the package is then tested, loaded and predicted with.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import zipfile
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch
from bioimageio.core import create_prediction_pipeline, predict
from bioimageio.spec import load_model_description

from vstain.channels import TARGETS
from vstain.inference import export
from vstain.inference.infer import predict_volume
from vstain.inference.tta import predict_tta
from vstain.modelfiles import load_generator
from vstain.models import Generator, GeneratorConfig
from vstain.preprocess.processed import write_processed, zscore
from vstain.volumes import read_volume

VOXEL = (0.29, 0.108, 0.108)
SHAPE = (1, 16, 40, 48)  # test input [1, Z, Y, X]: unequal axes on the package's 8 + 8n grid


@pytest.fixture(scope="module")
def no_network():
    """Every connection or name lookup is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:2] or args[:1])
        raise OSError("network blocked by the test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield attempts


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """``run/04_unet`` of a seeded width-4 generator, and ``run/01_data`` of simulated FOVs."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(3)
    gen = Generator(GeneratorConfig(base_width=4))
    (run / "04_unet" / "checkpoints").mkdir(parents=True)
    state = {f"generator.{k}": v for k, v in gen.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 2}, run / "04_unet" / "checkpoints" / "last.ckpt")
    (run / "04_unet" / "model.json").write_text(json.dumps(
        {"config": {"base_width": 4}, "model": "unet", "generator": asdict(gen.cfg), "global_step": 2}))
    (run / "01_data").mkdir()
    (run / "01_data" / "manifest.json").write_text(json.dumps({"params": {"source": "synthetic"}}))
    pd.DataFrame({"fov_id": ["a", "b"], "pixel_size_z": VOXEL[0], "pixel_size_y": VOXEL[1],
                  "pixel_size_x": VOXEL[2]}).to_csv(run / "01_data" / "fovs.csv", index=False)
    return run / "04_unet"


@pytest.fixture(scope="module")
def brightfield():
    """A raw (not z-scored) brightfield volume: offset and scale the package must remove."""
    return (np.random.default_rng(0).standard_normal(SHAPE) * 40 + 900).astype(np.float32)


@pytest.fixture(scope="module")
def package(stage, brightfield, no_network, tmp_path_factory):
    path = export.export_bioimageio(stage, tmp_path_factory.mktemp("pkg") / "model.zip", test_input=brightfield)
    assert no_network == []
    return path


def test_package_passes_bioimageio_model_test_offline(package, no_network):
    summary = export.check_package(package)
    names = {d.name: d.status for d in summary.details}
    assert summary.status == "passed", summary.display() or names
    for wf in ("pytorch_state_dict", "torchscript"):
        assert names[f"Reproduce test outputs from test inputs ({wf})"] == "passed"
    assert no_network == []
    with pytest.raises(OSError, match="blocked"):  # the block is live: an attempt would have shown
        socket.create_connection(("example.org", 443), 1.0)
    assert len(no_network) == 1
    no_network.clear()


# bioimageio.core's model test as Fiji, ilastik or a user's `bioimageio test` run it: a fresh
# interpreter that never imports vstain (the TorchScript weights need none), with the network refused.
FRESH_TEST = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network blocked by the test")
socket.socket.connect = socket.socket.connect_ex = socket.getaddrinfo = socket.create_connection = refuse
from bioimageio.core import test_model
from bioimageio.spec import load_model_description
descr = load_model_description(sys.argv[1], perform_io_checks=True, known_files={sys.argv[2]: None})
summary = test_model(descr, weight_format="torchscript")
assert "vstain" not in sys.modules, "the model test imported vstain"
print(summary.status)
summary.status == "passed" or print(summary.display())
"""


def test_package_passes_the_model_test_in_an_interpreter_without_vstain(package, tmp_path):
    r = subprocess.run([sys.executable, "-c", FRESH_TEST, str(package), export.THESIS_URL], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0] == "passed", r.stdout[-3000:]


def test_package_contents(package, brightfield):
    with zipfile.ZipFile(package) as z:
        names = set(z.namelist())
        readme = z.read("README.md").decode()
        np.testing.assert_array_equal(np.load(z.open("test_input.npy")), brightfield[None])
    assert {"rdf.yaml", "weights.pt", "weights_torchscript.pt", "cover.png", "test_output.npy"} <= names
    assert "Venieri" in readme and "0.29, 0.108, 0.108 µm" in readme
    assert "Simulated hiPSC fields of view" in readme and "for 2 optimiser steps" in readme
    assert "## Validation" in readme and "## Limits" in readme


def test_package_predicts_as_the_stage_generator(stage, package, brightfield):
    expected = predict_volume(load_generator(stage), zscore(brightfield))
    gen, _ = export.load_package(package)
    np.testing.assert_allclose(predict_volume(gen, zscore(brightfield)), expected, atol=1e-5)
    descr = load_model_description(package, perform_io_checks=False)
    for wf in ("pytorch_state_dict", "torchscript"):
        # predict() loads and unloads the pipeline itself (a second unload would wait forever)
        pp = create_prediction_pipeline(bioimageio_model=descr, weight_format=wf, devices=["cpu"])
        out = predict(model=pp, inputs={"brightfield": brightfield[None]})
        got = out.members["fluorescence"].data.to_numpy()[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=wf)


def test_load_package_round_trips_metadata(package):
    gen, info = export.load_package(package)
    assert info.channel_names == list(TARGETS)
    assert info.voxel_size_zyx == pytest.approx(VOXEL)
    assert info.trained_on == "synthetic"
    assert info.generator == asdict(GeneratorConfig(base_width=4)) == asdict(gen.cfg)
    assert not gen.training


@pytest.mark.parametrize("shape", [(1, 1, 8, 8, 8), (2, 1, 9, 37, 50), (1, 1, 17, 33, 34)])
def test_torchscript_matches_generator_at_any_size(shape):
    torch.manual_seed(1)
    gen = Generator(GeneratorConfig(base_width=4)).eval()
    scripted = export.to_torchscript(gen)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), gen(x), atol=1e-5, rtol=1e-5)


def test_torchscript_refuses_small_input():
    scripted = export.to_torchscript(Generator(GeneratorConfig(base_width=4)))
    with pytest.raises(Exception, match="at least|>= 8"):
        scripted(torch.zeros(1, 1, 7, 16, 16))


def test_export_rejects_bad_input(stage, tmp_path):
    with pytest.raises(ValueError, match="test_input"):
        export.export_bioimageio(stage, tmp_path / "a.zip", test_input=np.zeros((1, 15, 40, 48), np.float32))
    with pytest.raises(ValueError, match="voxel_size_zyx"):
        export.export_bioimageio(Generator(GeneratorConfig(base_width=4)), tmp_path / "b.zip")
    with pytest.raises(FileNotFoundError, match="model.json"):
        export.export_bioimageio(tmp_path, tmp_path / "c.zip", VOXEL)
    with pytest.raises(ValueError, match="trained_on"):
        export.export_bioimageio(stage, tmp_path / "d.zip", trained_on="real")
    with pytest.raises(FileNotFoundError, match="no such bioimage.io package"):
        export.load_package(tmp_path / "missing.zip")


def test_default_test_input_is_a_central_crop_of_a_test_fov(tmp_path):
    rng = np.random.default_rng(4)
    records = [{"fov_id": f"f{i}", "gene": "FBL", "structure": "nucleoli", "bf": rng.random((20, 50, 70)),
                "target": rng.random((6, 20, 50, 70))} for i in range(4)]
    rows = write_processed(tmp_path, records, fractions=(0.5, 0.25, 0.25))
    x = export.default_test_input(tmp_path, shape=(16, 64, 64))
    assert x.shape == (1, 16, 48, 64)  # each axis: at most the requested size, a multiple of 8
    fov = read_volume(tmp_path / rows[rows["split"] == "test"].iloc[0]["path"])[:1]
    np.testing.assert_array_equal(x, fov[:, 2:18, 1:49, 3:67])
    noise = export.default_test_input(None, shape=(8, 16, 24), seed=5)
    assert noise.shape == (1, 8, 16, 24)
    np.testing.assert_array_equal(noise, export.default_test_input(None, shape=(8, 16, 24), seed=5))


# --------------------------------------------------------------------------------------------
# Flip test-time augmentation
# --------------------------------------------------------------------------------------------
def test_tta_is_the_mean_of_the_four_flips():
    torch.manual_seed(2)
    gen = Generator(GeneratorConfig(base_width=4))
    x = np.random.default_rng(1).standard_normal((1, 9, 21, 26)).astype(np.float32)
    mean, std = predict_tta(gen, x)
    assert mean.shape == std.shape == (6, 9, 21, 26) and mean.dtype == std.dtype == np.float32
    preds = np.stack([np.flip(predict_volume(gen, np.flip(x, a).copy()), a) for a in ((), (2,), (3,), (2, 3))])
    np.testing.assert_allclose(mean, preds.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, preds.std(0), atol=1e-5)
    assert std.max() > 0  # a conv net with zero-padded borders is not flip-equivariant


def test_tta_of_an_equivariant_prediction_has_zero_spread():
    def pointwise(_, v):  # flip-equivariant by construction: each voxel on its own
        return np.repeat(np.tanh(v), 6, axis=0)

    for x in (np.full((1, 8, 11, 13), 0.7, np.float32), np.random.default_rng(2).random((1, 8, 11, 13))):
        mean, std = predict_tta(None, x, predict_fn=pointwise)
        np.testing.assert_allclose(mean, pointwise(None, x), atol=1e-6)
        assert np.abs(std).max() < 1e-6


def test_tta_spread_of_a_ramp_in_x():
    nx = 13
    ramp = np.arange(nx, dtype=np.float32)

    def add_ramp(_, v):  # not equivariant in X: flipped back, the ramp runs the other way
        return np.repeat(v + ramp, 2, axis=0)

    x = np.zeros((1, 8, 9, nx), np.float32)
    mean, std = predict_tta(None, x, predict_fn=add_ramp)
    np.testing.assert_allclose(mean[0, 0, 0], (ramp + ramp[::-1]) / 2, atol=1e-5)
    np.testing.assert_allclose(std[1, 3, 4], np.abs(ramp - ramp[::-1]) / 2, atol=1e-5)


def test_tta_rejects_a_batch():
    with pytest.raises(ValueError, match=r"\[1, Z, Y, X\]"):
        predict_tta(None, np.zeros((1, 1, 8, 8, 8)))
