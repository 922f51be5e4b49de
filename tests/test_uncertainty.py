"""Test-time augmentation on a processed set: the per-FOV table and the paired gain."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from vstain.channels import TARGETS
from vstain.evaluate.uncertainty import tta_gain, tta_table, tta_verdict
from vstain.models import Generator, GeneratorConfig
from vstain.preprocess.processed import write_processed


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    rng = np.random.default_rng(1)
    shape = (9, 20, 23)
    recs = []
    for s in ("mito", "envelope", "actomyosin", "nucleoli"):
        for i in range(3):
            truth = rng.normal(size=(6, *shape)).astype(np.float32)
            target = truth.copy()
            target[[c for c, t in enumerate(TARGETS) if t not in {"dna", "membrane", s}]] = np.nan
            recs.append({"fov_id": f"{s}{i}", "gene": s.upper(), "structure": s, "bf": rng.normal(size=shape),
                         "target": target, "truth": truth})
    path = tmp_path_factory.mktemp("p") / "03_denoising"
    write_processed(path, recs)
    return path


def test_tta_table_scores_every_channel_against_the_truth(stage):
    torch.manual_seed(0)
    gen = Generator(GeneratorConfig(base_width=4)).eval()
    table = tta_table(gen, stage, split="test")
    assert set(table["reference"]) == {"truth"}
    assert len(table) == table["fov_id"].nunique() * len(TARGETS)
    assert table[["pcc_plain", "pcc_tta", "spearman"]].notna().all().all()
    assert (table["spearman"].abs() <= 1).all()
    gain = tta_gain(table, n_resamples=999)
    assert list(gain["channel"]) == list(TARGETS)
    assert {"diff", "ci_low", "ci_high", "better", "spearman_median"} <= set(gain.columns)


def test_tta_verdict_names_each_channel_with_its_decision():
    rows = []
    for f in range(8):
        for c in TARGETS:
            plain = 0.5 + 0.01 * f
            rows.append({"fov_id": str(f), "channel": c, "reference": "truth", "pcc_plain": plain,
                         "pcc_tta": plain + (0.05 if c == "dna" else 0.0), "spearman": 0.3})
    text = tta_verdict(tta_gain(pd.DataFrame(rows), n_resamples=999))
    assert "DNA: TTA raises the PCC (PCC +0.0500" in text
    assert "Nucleoli: no detectable difference with n = 8 FOVs" in text and "n = 8 FOVs" in text
