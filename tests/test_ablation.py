"""The U-Net ablation: each new training option (masked MSE, BatchNorm, balanced crops, a subset of
channels), matched-compute variants, the comparison with the baseline and its paragraph, and that
the defaults still train the plain masked-L1 loop."""
import numpy as np
import pandas as pd
import pytest
import torch
from test_train import tiny_cfg, tiny_records

from vstain.channels import TARGETS
from vstain.losses import PIXEL_LOSSES, masked_l1, masked_mse
from vstain.modelfiles import read_metrics
from vstain.models import Generator, GeneratorConfig, InstanceNorm3d
from vstain.preprocess import processed
from vstain.studies import ablation
from vstain.training.configs import UNetConfig
from vstain.training.trainer import make_optimizer
from vstain.training.unet import fit_unet

SHAPE = (11, 20, 23)  # odd, unequal Z, Y, X


def records(counts: dict[str, int], seed=0):
    """FOVs per tagged structure (``counts``), each with DNA, membrane and its structure labelled,
    and a clean truth of all six channels."""
    return tiny_records(seed=seed, counts=counts, shape=SHAPE, clean_truth=True)


def write_set(stage, counts, splits):
    """A processed set whose FOVs get the given ``splits`` in order (no stratified split)."""
    rows = [processed.write_processed_fov(stage, r) for r in records(counts)]
    df = pd.DataFrame(rows)
    df.insert(3, "split", splits)
    df.to_csv(stage / processed.MANIFEST_CSV, index=False)
    return stage


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """Four structures, one FOV of each per split."""
    structures = ("mito", "envelope", "actomyosin", "nucleoli")
    return write_set(tmp_path_factory.mktemp("four"), {s: 3 for s in structures}, ["train", "val", "test"] * 4)


# --- losses ------------------------------------------------------------------------------------
def test_masked_mse_on_a_hand_made_case():
    pred = torch.zeros(1, 2, 1, 1, 3)
    target = torch.tensor([[[[[1.0, -2.0, float("nan")]]], [[[float("nan")] * 3]]]])
    assert masked_mse(pred, target).item() == pytest.approx((1 + 4) / 2)  # two labelled voxels
    assert masked_l1(pred, target).item() == pytest.approx((1 + 2) / 2)
    assert PIXEL_LOSSES["l1+mse"](pred, target).item() == pytest.approx(2.5 + 1.5)
    with pytest.raises(ValueError, match="masked_mse: the target carries no labelled voxel"):
        masked_mse(pred, torch.full_like(pred, float("nan")))


# --- configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("loss", "huber"), ("norm", "group"), ("sampling", "weighted"),
                                        ("channels", ("mito", "golgi")), ("channels", ("dna", "dna"))])
def test_new_options_are_validated_by_name(key, value):
    with pytest.raises(ValueError, match=key):
        UNetConfig(**{key: value})


def test_defaults_are_the_thesis_and_round_trip():
    cfg = UNetConfig()
    assert (cfg.loss, cfg.norm, cfg.sampling, cfg.channels, cfg.targets) == ("l1", "instance", "uniform", (), TARGETS)
    one = UNetConfig(channels=["nucleoli"], norm="batch")
    assert UNetConfig.from_dict(one.to_dict()) == one
    assert (one.generator_config().out_channels, one.generator_config().norm) == (1, "batch")


# --- BatchNorm generator -----------------------------------------------------------------------
def test_batchnorm_generator_forward_and_eval_independence():
    torch.manual_seed(0)
    gen = Generator(GeneratorConfig(base_width=2, norm="batch"))
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in gen.modules())
    assert not any(isinstance(m, InstanceNorm3d) for m in gen.modules())
    x = torch.randn(3, 1, 9, 13, 17)
    assert gen(x).shape == (3, 6, 9, 13, 17)  # training mode: batch statistics
    gen.eval()  # running statistics: a sample's output no longer depends on its batch
    with torch.no_grad():
        assert torch.allclose(gen(x)[:1], gen(x[:1]), atol=1e-6)
    with pytest.raises(ValueError, match="norm must be one of"):
        GeneratorConfig(norm="layer")


# --- crops -------------------------------------------------------------------------------------
def test_balanced_sampling_draws_each_structure_equally(tmp_path):
    stage = write_set(tmp_path, {"mito": 4, "envelope": 1}, ["train"] * 5)
    mito = TARGETS.index("mito")
    share = {}
    for sampling in ("uniform", "balanced"):
        crops = processed.ProcessedCrops(stage, "train", (8, 8, 8), samples=240, flips=False, sampling=sampling)
        share[sampling] = np.mean([bool(torch.isfinite(crops[i][1][mito]).all()) for i in range(len(crops))])
    assert share["uniform"] == pytest.approx(0.8, abs=0.08)  # 4 of 5 FOVs are mito
    assert share["balanced"] == pytest.approx(0.5, abs=0.1)  # 1 of 2 structures


def test_channel_selection_keeps_only_fovs_that_carry_it(four):
    crops = processed.ProcessedCrops(four, "train", (8, 16, 16), samples=12, channels=("nucleoli",))
    assert crops.ids == ["nucleoli0"]
    x, y = crops[5]
    assert x.shape == (1, 8, 16, 16) and y.shape == (1, 8, 16, 16) and torch.isfinite(y).all()
    both = processed.ProcessedCrops(four, "train", (8, 16, 16), samples=2, channels=("dna", "membrane"))
    assert len(both.ids) == 4 and both[0][1].shape[0] == 2
    with pytest.raises(ValueError, match=r"no FOV with labels for \['mito', 'nucleoli'\] in split 'train'"):
        processed.ProcessedCrops(four, "train", (8, 16, 16), channels=("mito", "nucleoli"))


# --- the defaults train as before --------------------------------------------------------------
def test_default_training_is_the_plain_masked_l1_loop(tmp_path):
    """With every new option at its default, the Lightning training takes the same steps as a
    plain loop of Adam on the masked L1 over the seeded crops: the same losses, bit for bit."""
    processed.write_processed(tmp_path / "stage", tiny_records())
    cfg = tiny_cfg(max_steps=3, val_every=100, ckpt_every=100)
    fit_unet(cfg, tmp_path / "stage", tmp_path / "out", progress=False)
    logged = read_metrics(tmp_path / "out")["train_l1"].dropna().tolist()
    torch.manual_seed(cfg.seed)
    gen = Generator(GeneratorConfig(base_width=cfg.base_width))
    opt = make_optimizer(gen.parameters(), "adam", cfg.lr, cfg.betas)
    crops = processed.ProcessedCrops(tmp_path / "stage", "train", cfg.crop, cfg.samples, flips=True, seed=cfg.seed)
    ref = []
    for step in range(3):
        xs, ys = zip(*(crops[i] for i in range(step * cfg.batch_size, (step + 1) * cfg.batch_size)))
        loss = masked_l1(gen(torch.stack(xs)), torch.stack(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref.append(loss.item())
    assert logged == ref


# --- variants ----------------------------------------------------------------------------------
def test_per_structure_splits_the_steps_over_six_single_output_models():
    cfgs = ablation.variant_configs("per-structure", UNetConfig(max_steps=40, val_every=25, ckpt_every=9))
    assert list(cfgs) == list(TARGETS)
    assert [c.max_steps for c in cfgs.values()] == [7, 7, 7, 7, 6, 6]
    assert all(c.channels == (ch,) and c.val_every <= c.max_steps for ch, c in cfgs.items())
    assert ablation.variant_configs("lr1e-3", UNetConfig())[""].lr == 1e-3
    with pytest.raises(ValueError, match="5 steps cannot be split over 6 models"):
        ablation.variant_configs("per-structure", UNetConfig(max_steps=5))
    with pytest.raises(ValueError, match="must include 'baseline'"):
        ablation.check_variants(["mse"])


def test_ablation_trains_scores_and_skips_what_is_finished(four, tmp_path):
    base = tiny_cfg(base_width=2, max_steps=6, val_every=6, ckpt_every=3, samples=4)
    runs = ablation.run_ablation(four, tmp_path, base, ["baseline", "per-structure"])
    assert runs["steps"].tolist() == [6, 6] and runs["models"].tolist() == [1, 6]  # matched compute
    assert set(runs["status"]) == {"trained"}
    scores = ablation.score_variants(four, tmp_path, ["baseline", "per-structure"])
    assert list(scores.columns) == ["variant", "channel", "fov_id", "pcc", "ssim"]
    assert len(scores) == 2 * 6 * 4  # variants x channels x test FOVs, every channel against the truth
    again = ablation.run_ablation(four, tmp_path, base, ["baseline", "per-structure"])
    assert set(again["status"]) == {"finished before"}


# --- comparisons and the paragraph -------------------------------------------------------------
def synthetic_scores(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for f in range(n):
        for ch in ("mito", "nucleoli"):
            base = 0.5 + 0.1 * rng.normal()
            gains = {"baseline": 0.0, "mse": 0.2 if ch == "nucleoli" else 0.0, "batchnorm": 0.0, "book-unet": 0.3}
            for v, g in gains.items():
                pcc = base + g + (0.05 * rng.normal() if v != "baseline" else 0.0)
                rows.append({"variant": v, "channel": ch, "fov_id": str(f), "pcc": pcc, "ssim": pcc / 2})
    return pd.DataFrame(rows)


def test_comparison_and_paragraph_name_the_factor_that_matters():
    comp = ablation.compare_to_baseline(synthetic_scores(9), n_resamples=999)
    cell = comp[(comp["variant"] == "mse") & (comp["channel"] == "nucleoli") & (comp["metric"] == "pcc")].iloc[0]
    assert cell["better"] == "mse" and cell["verdict"] == "mse better" and cell["ci_low"] > 0.1
    assert cell["p"] < 0.01 and cell["n"] == 9
    text = ablation.findings_paragraph(comp)
    assert "Nucleoli: PCC" in text and "the masked MSE loss instead of L1 (raises it by 0.1" in text
    assert "the other 1 variant shows no detectable difference with n = 9 FOVs" in text
    assert "Mitochondria: no single factor changes PCC" in text and "no detectable difference with n = 9 FOVs" in text
    assert "book" not in text  # the book's U-Net is no single factor


def test_too_few_fovs_cannot_decide():
    comp = ablation.compare_to_baseline(synthetic_scores(4), n_resamples=999)
    assert set(comp["verdict"]) == {"cannot be decided with n = 4 FOVs"}
    assert ablation.findings_paragraph(comp) == ("Nucleoli: PCC cannot be decided with n = 4 FOVs. "
                                                 "Mitochondria: PCC cannot be decided with n = 4 FOVs.")
