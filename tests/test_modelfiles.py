"""One rule decides that a model folder is finished, for every trainer (vstain.modelfiles.is_finished),
and model.json is written by rename and marked complete last."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from vstain.modelfiles import (CHECKPOINTS, MODEL_JSON, PREDICTIONS, config_changes, is_finished, prepare_out_dir,

    read_model_json, run_config, save_model_json)
from vstain.training.configs import UNetConfig, WGANConfig


@pytest.fixture
def stage_in(tmp_path):
    """A processed set's manifest with two test FOVs and one val FOV (no volumes needed)."""
    d = tmp_path / "03_denoising"
    d.mkdir()
    pd.DataFrame({"fov_id": ["3", "7", "9"], "split": ["test", "test", "val"], "structure": "mito",
                  "path": "x.tif", "truth_path": "", "labels_path": ""}).to_csv(d / "manifest.csv", index=False)
    return d


def finished_folder(tmp_path, cfg, stage_in, *inputs, fovs=("3", "7"), **extra):
    out = tmp_path / "model"
    (out / PREDICTIONS).mkdir(parents=True)
    for f in fovs:
        (out / PREDICTIONS / f"{f}.tif").write_bytes(b"")
    meta = {"global_step": cfg.optimiser_steps, **extra}
    save_model_json(out, run_config(cfg.to_dict(), stage_in, *inputs), complete=True, **meta)
    return out


@pytest.mark.parametrize("cfg", [UNetConfig(max_steps=5), WGANConfig(iterations=3, n_critic=2)])
def test_a_complete_folder_of_the_same_run_is_finished(tmp_path, stage_in, cfg):
    out = finished_folder(tmp_path, cfg, stage_in)
    assert is_finished(out, cfg, stage_in)
    assert is_finished(out, type(cfg)(**{**cfg.to_dict(), "num_threads": 1}), stage_in)  # resumable: no retrain
    assert not is_finished(out, type(cfg)(**{**cfg.to_dict(), "seed": 1}), stage_in)
    assert not is_finished(out, cfg, stage_in, splits=("val", "test"))  # val predictions missing


def test_steps_short_of_the_budget_are_not_finished_unless_training_stopped(tmp_path, stage_in):
    cfg = WGANConfig(iterations=3, n_critic=2)
    assert cfg.optimiser_steps == 9
    short = finished_folder(tmp_path, cfg, stage_in, global_step=6)
    assert not is_finished(short, cfg, stage_in)
    save_model_json(short, run_config(cfg.to_dict(), stage_in), complete=True, global_step=6, stopped="diverged")
    assert is_finished(short, cfg, stage_in)


def test_an_incomplete_or_cut_short_record_is_not_finished(tmp_path, stage_in):
    cfg = UNetConfig(max_steps=5)
    out = finished_folder(tmp_path, cfg, stage_in)
    save_model_json(out, run_config(cfg.to_dict(), stage_in), global_step=5)  # training started, not done
    assert read_model_json(out)["complete"] is False and not is_finished(out, cfg, stage_in)
    (out / MODEL_JSON).write_text('{"config": {"base_wid')  # a kill during a plain write
    assert read_model_json(out) is None and not is_finished(out, cfg, stage_in)
    (out / CHECKPOINTS).mkdir()
    with pytest.warns(UserWarning, match="unreadable"):
        assert prepare_out_dir(out, cfg, run_config(cfg.to_dict(), stage_in)) is False
    assert not (out / CHECKPOINTS).exists() and not (out / MODEL_JSON).exists()


def test_a_fresh_start_drops_the_snapshots_of_an_earlier_run(tmp_path, stage_in):
    """Retraining from scratch (a changed config, or no checkpoint to resume) must not keep an
    earlier run's snapshots as its own; a run that resumes keeps them."""
    cfg = UNetConfig(max_steps=5)
    out = finished_folder(tmp_path, cfg, stage_in)
    config = run_config(cfg.to_dict(), stage_in)

    def old_snapshots():
        (out / "snapshots").mkdir(exist_ok=True)
        (out / "snapshots" / "step_000005.pt").write_bytes(b"old")
        (out / "snapshots.csv").write_text("step,wall_s,path\n5,1.0,snapshots/step_000005.pt\n")

    old_snapshots()
    (out / CHECKPOINTS).mkdir(exist_ok=True)
    (out / CHECKPOINTS / "last.ckpt").write_bytes(b"ckpt")
    assert prepare_out_dir(out, cfg, config) is True  # resumes: the snapshots are this run's
    assert (out / "snapshots.csv").exists()
    with pytest.warns(UserWarning, match="configuration changed"):
        assert prepare_out_dir(out, UNetConfig(max_steps=5, lr=1e-3), run_config(
            UNetConfig(max_steps=5, lr=1e-3).to_dict(), stage_in)) is False
    assert not (out / "snapshots").exists() and not (out / "snapshots.csv").exists()
    old_snapshots()  # no checkpoint at all (deleted by hand): a fresh start too
    assert prepare_out_dir(out, cfg, config) is False and not (out / "snapshots").exists()


def test_keys_added_since_a_record_count_as_their_default(tmp_path, stage_in):
    cfg = WGANConfig(iterations=3)
    out = finished_folder(tmp_path, cfg, stage_in)
    meta = json.loads((out / MODEL_JSON).read_text())
    del meta["config"]["critic_channels_last"], meta["config"]["adv_weighting"]  # a record from before these keys
    (out / MODEL_JSON).write_text(json.dumps(meta))
    assert is_finished(out, cfg, stage_in)
    assert not is_finished(out, WGANConfig(iterations=3, adv_weighting="balanced"), stage_in)
    assert config_changes(meta["config"], run_config(cfg.to_dict(), stage_in), cfg) == []


def test_another_processed_set_or_initial_checkpoint_is_another_run(tmp_path, stage_in):
    init = tmp_path / "unet.ckpt"
    init.write_bytes(b"weights")
    cfg = WGANConfig(iterations=3, init_from=str(init))
    out = finished_folder(tmp_path, cfg, stage_in, init)
    assert is_finished(out, cfg, stage_in, init)
    init.write_bytes(b"other weights")
    assert not is_finished(out, cfg, stage_in, init)
