"""The simulator's realism (vstain.data.cells, vstain.data.organelles, vstain.evaluate.realism): the
geometry and cell cycle within published ranges, walls that do not follow from the nuclei, the same
world at two voxel sizes, the refractive-index ordering, and the learnability ordering's numbers."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from vstain.channels import TARGETS
from vstain.data import cells
from vstain.data.simconfig import REAL_PIXEL_SIZE
from vstain.data.simulate import SimConfig, simulate_fov
from vstain.evaluate import learnability, realism
from vstain.evaluate.metrics import thesis_table41

BOOK = SimConfig(shape=(60, 110, 110), pixel_size=(0.3, 0.3, 0.3))


@pytest.fixture(scope="module")
def world() -> dict[str, pd.DataFrame]:
    return realism.measure_world(BOOK, n_fovs=4, seed=0)


def test_cell_and_nuclear_volumes_and_heights_in_published_ranges(world):
    c = world["cells"]
    assert len(c) >= 5
    # interphase hiPSCs: 1160-2320 µm³ (allen_sizescaling); the nucleus a large share (thomson1998)
    interphase = c[c["phase"] != "M"]
    assert 1000 < interphase["cell_um3"].median() < 2320
    assert 0.4 < interphase["nc_ratio"].median() < 1.0  # nucleus 30-50 % of the cell
    lo, hi = BOOK.cell_height
    assert (c["height_um"] > 0.8 * lo).all() and (c["height_um"] <= BOOK.tallest_um + 1e-6).all()
    assert c["diameter_um"].between(9, 20).mean() > 0.9
    assert world["fovs"]["mito_fraction"].between(0.02, 0.09).all()


def test_nucleoli_a_set_share_of_each_nucleus_growing_with_it_and_poor_in_dna(world):
    """Nucleoli take ``nucleoli_fraction`` of each interphase nucleus (up to ~25 %, jastrow_nucleolus),
    so larger nuclei hold larger nucleoli (weber2015), and their DNA is a third of the nucleoplasm's
    (proteinatlas_nucleoli)."""
    c = world["cells"]
    c = c[(c["phase"] != "M") & (c["nucleoli"] > 0)]
    lo, hi = BOOK.nucleoli_fraction
    assert len(c) >= 5
    assert c["nucleoli_fraction"].between(0.5 * lo, 1.5 * hi).mean() > 0.8  # clipped by walls and soft edges
    assert 0.5 * lo < c["nucleoli_fraction"].median() < hi
    volume = c["nucleoli_fraction"] * c["nucleus_um3"]
    assert np.corrcoef(c["nucleus_um3"], volume)[0, 1] > 0.3
    assert (c["nucleoli"].value_counts(normalize=True).get(1, 0)) > 0.25  # mostly one large nucleolus
    f = simulate_fov(BOOK, "nucleoli", 1)
    d = f["density"]
    core = (d["nucleus"] > 0.99) & (d["chromosomes"] < 0.01)
    inside, outside = core & (d["nucleoli"] > 0.99), core & (d["nucleoli"] < 0.01)
    ratio = d["dna"][inside].mean() / d["dna"][outside].mean()
    np.testing.assert_allclose(ratio, BOOK.nucleolar_dna, rtol=0.2)
    none = simulate_fov(dataclasses.replace(BOOK, nucleoli_fraction=(0.0, 0.0)), "nucleoli", 1)
    assert none["density"]["nucleoli"].max() < 0.01


def test_mitotic_cells_at_the_set_rate_with_condensed_dna_and_no_envelope():
    phase, content = cells._cycle(BOOK, 20000, np.random.default_rng(0))
    share = np.bincount(phase, minlength=4) / len(phase)
    np.testing.assert_allclose(share, BOOK.cycle_fractions, atol=0.01)
    assert (content[phase == 0] == 1).all() and (content[phase >= 2] == 2).all()
    assert ((content[phase == 1] > 1) & (content[phase == 1] < 2)).all()
    # a FOV with a mitotic cell: its DNA is brighter than interphase nuclei, and it has no envelope
    cfg = dataclasses.replace(BOOK, cycle_fractions=(0.0, 0.0, 0.5, 0.5))
    f = simulate_fov(cfg, "envelope", 3)
    inst = f["instances"]
    m = inst[(inst["phase"] == "M") & (inst["nucleus_um3"] > 20)]
    i = inst[(inst["phase"] == "G2") & (inst["nucleus_um3"] > 20)]
    assert len(m) and len(i)
    nuclei, dna = f["labels"]["nuclei"], f["density"]["dna"]
    env = f["density"]["envelope"]
    m_dna = np.mean([dna[nuclei == k].mean() for k in m["id"]])
    i_dna = np.mean([dna[nuclei == k].mean() for k in i["id"]])
    assert m_dna > 2 * i_dna
    assert max(env[nuclei == k].max() for k in m["id"]) < 0.01 < min(env[nuclei == k].max() for k in i["id"])


def test_walls_do_not_follow_from_the_nuclei():
    offsets = [realism.wall_offset_um(f["labels"]["cells"], f["labels"]["nuclei"], f["pixel_size"])
               for f in (simulate_fov(BOOK, "mito", s) for s in range(2))]
    assert min(offsets) > 0.6
    # the control: cells that are the Voronoi regions of their nuclei have walls on the nuclei's
    # Voronoi walls
    rng = np.random.default_rng(0)
    sites = rng.uniform(0, 33, (12, 2))
    yy, xx = np.meshgrid(np.arange(110) * 0.3 + 0.15, np.arange(110) * 0.3 + 0.15, indexing="ij")
    d = (yy[..., None] - sites[:, 0]) ** 2 + (xx[..., None] - sites[:, 1]) ** 2
    voronoi = (d.argmin(-1) + 1).astype(np.uint16)
    cells_ = np.broadcast_to(voronoi, (10, 110, 110))
    nuclei = np.where(np.broadcast_to(d.min(-1) < 1.5**2, cells_.shape), cells_, 0).astype(np.uint16)
    assert realism.wall_offset_um(cells_, nuclei, (0.3, 0.3, 0.3)) < 0.3


def test_the_same_world_at_the_real_and_the_book_voxel_size():
    # equal physical extents: 60 x 0.29 = 58 x 0.3 µm in z, 150 x 0.108 = 54 x 0.3 µm in y and x
    fine = SimConfig(shape=(60, 150, 150), pixel_size=REAL_PIXEL_SIZE)
    coarse = SimConfig(shape=(58, 54, 54), pixel_size=(0.3, 0.3, 0.3))
    a, b = simulate_fov(fine, "mito", 11), simulate_fov(coarse, "mito", 11)
    ta, tb = a["instances"].set_index("site"), b["instances"].set_index("site")
    assert set(ta.index) == set(tb.index)
    assert (ta["phase"] == tb.loc[ta.index, "phase"]).all()
    big = ta["cell_um3"] > 100
    np.testing.assert_allclose(ta.loc[big, "cell_um3"], tb.loc[ta.index[big], "cell_um3"], rtol=0.1)
    np.testing.assert_allclose(ta.loc[big, "nucleus_um3"], tb.loc[ta.index[big], "nucleus_um3"], rtol=0.15, atol=5)
    fa = a["density"]["mito"].sum() / a["density"]["cytoplasm"].sum()
    fb = b["density"]["mito"].sum() / b["density"]["cytoplasm"].sum()
    assert abs(fa - fb) < 0.25 * fb


def test_refractive_index_ordering(world):
    n = world["index"].median()
    # medium < nucleus < cytoplasm < nucleoli < mitochondria < lipid droplets (liu2016, schurmann2016)
    assert BOOK.n_medium < n["nucleus"] < n["cytoplasm"] < n["nucleoli"] < n["mito"] < n["lipid"]


def test_membrane_is_not_given_away_by_the_nuclei():
    fovs = []
    for s in range(4):
        f = simulate_fov(BOOK, ("mito", "envelope")[s % 2], 50 + s)
        fovs.append((f["truth"], f["labels"], f["pixel_size"], (f["focus_z_lo"], f["focus_z_hi"])))
    p = realism.geometry_predictability(fovs).set_index(["channel", "source"])["pcc"]
    assert p["membrane", "nuclei only"] < p["membrane", "cells and nuclei"] - 0.15
    assert p["membrane", "nuclei only"] < 0.6
    assert p["dna", "nuclei only"] > 0.6  # the nuclei do give DNA away: the predictor works
    with pytest.raises(ValueError, match="at least 2 FOVs"):
        realism.geometry_predictability(fovs[:1])


def _pixel_metrics(pcc: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"fov_id": f"f{i}", "model": "U-Net", "channel": c, "metric": "pcc", "value": v}
                         for c, vs in pcc.items() for i, v in enumerate(vs)])


def test_learnability_rho_and_differences():
    thesis = thesis_table41()["pcc_mean"].xs("U-Net", level="model")
    same = _pixel_metrics({c: [thesis[c] - 0.01, thesis[c] + 0.01, thesis[c]] for c in TARGETS})
    table, summary = learnability.learnability(same, n_resamples=200)
    assert summary["rho"].iloc[0] == pytest.approx(1.0)
    assert summary["within"].iloc[0] == 6
    np.testing.assert_allclose(table["difference"], 0, atol=1e-9)
    assert (table["rank"] == table["thesis_rank"]).all()
    reverse = _pixel_metrics({c: [1.6 - thesis[c]] * 3 for c in TARGETS})
    table, summary = learnability.learnability(reverse, n_resamples=200)
    assert summary["rho"].iloc[0] == pytest.approx(-1.0)
    assert "**-1.00**" in learnability.learnability_sentence(summary, table)
    # one FOV per channel: the rho, but no interval, and the sentence says why
    table, summary = learnability.learnability(_pixel_metrics({c: [thesis[c]] for c in TARGETS}))
    assert summary["rho"].iloc[0] == pytest.approx(1.0) and np.isnan(summary["rho_lo"].iloc[0])
    assert "no interval" in learnability.learnability_sentence(summary, table)
    with pytest.raises(ValueError, match="no PCC for"):
        learnability.learnability(_pixel_metrics({c: [0.5] for c in TARGETS[:5]}))


def test_published_table_marks_what_lies_in_range():
    from vstain.evaluate.published import Published, compare, psf_table

    world = {"cells": pd.DataFrame({"phase": ["G1", "S", "M"], "cell_um3": [1500.0, 1700.0, 9000.0]}),
             "fovs": pd.DataFrame({"f": [0.5, 0.7]})}
    rows = (Published("volume", "µm³", 1160, 2320, "allen_sizescaling", "cells", "cell_um3"),
            Published("f", "", 0.1, 0.2, "x", "fovs", "f"), Published("g", "", None, None, "assumption", "fovs", "f"))
    t = compare(rows, world).set_index("quantity")
    assert t.loc["volume", "simulated median"] == 1600 and t.loc["volume", "n"] == 2  # the mitotic cell left out
    assert t.loc["volume", "in range"] == "yes" and t.loc["f", "in range"] == "no" and t.loc["g", "in range"] == ""
    assert t.loc["g", "published"] == "none published"
    # a fraction of cells is pooled over the FOVs' cells, not the median FOV's
    world = {"fovs": pd.DataFrame({"cells": [10, 10, 20], "m": [0.0, 0.0, 0.1]})}
    pooled = compare((Published("m", "", 0.03, 0.05, "x", "fovs", "m", pooled=True),), world).iloc[0]
    assert pooled["simulated median"] == pytest.approx(0.05) and pooled["in range"] == "yes"
    psf = psf_table(BOOK).set_index("channel")
    # the pinhole narrows the PSF in z; the far-red membrane dye is widest
    assert (psf["confocal FWHM z"] < psf["widefield FWHM z"]).all()
    assert psf["confocal FWHM xy"].idxmax() == "membrane"
    assert psf.loc["mito", "confocal FWHM xy"] == pytest.approx(0.51 * 0.488 / 1.25, rel=1e-6)


def test_brightfield_shares_split_the_image_by_compartment():
    f = simulate_fov(BOOK, "nucleoli", 2)
    shares = realism.brightfield_shares(f, BOOK)
    assert set(shares) >= {"cytoplasm", "nucleus", "nucleoli", "mito", "lipid", "membrane"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["mito"] > 0.02 and shares["nucleoli"] > 0
    # a compartment without an index step is invisible
    flat = dataclasses.replace(BOOK, n_nucleoli=BOOK.n_nucleus)
    assert realism.brightfield_shares(f, flat)["nucleoli"] == 0


def test_channel_budget_finds_the_channel_still_learned_and_says_so(tmp_path):
    from test_train import tiny_records
    from vstain.preprocess import processed
    from vstain.volumes import write_volume

    stage03 = tmp_path / "03"
    processed.write_processed(stage03, tiny_records(counts={"mito": 8}, shape=(6, 12, 12), clean_truth=True))
    raw = pd.read_csv(stage03 / processed.MANIFEST_CSV)
    raw.assign(split="test").to_csv(stage03 / processed.MANIFEST_CSV, index=False)  # all 8 scored: a decision
    man = processed.read_manifest(stage03)
    rng = np.random.default_rng(0)
    rows = []
    for step in (2, 4, 8):
        d = tmp_path / "curves" / f"step_{step}"
        for _, r in man.iterrows():
            truth = processed.load_fov(r)[2].copy()
            noise = rng.normal(size=truth.shape[1:]).astype(np.float32)
            truth[TARGETS.index("nucleoli")] = noise  # never learned
            if step < 8:
                truth[TARGETS.index("envelope")] = noise + 0.3 * truth[TARGETS.index("envelope")]  # learned late
            write_volume(d / "predictions" / f"{r['fov_id']}.tif", truth)
        rows.append({"model": "U-Net", "step": step, "dir": str(d)})
    snaps = tmp_path / "curves" / "snapshot_predictions.csv"
    pd.DataFrame(rows).to_csv(snaps, index=False)
    table = learnability.channel_budget(stage03, snaps).set_index("channel")
    assert (table["mid_step"] == 4).all() and (table["last_step"] == 8).all() and (table["n"] == 8).all()
    assert table.loc["envelope", "learning"] == "still rising" and table.loc["envelope", "gain"] > 0.3
    assert table.loc["nucleoli", "learning"] == "no detectable change" and table.loc["nucleoli", "pcc_last"] < 0.2
    assert table.loc["dna", "learning"] == "no detectable change" and table.loc["dna", "pcc_last"] > 0.99
    text = learnability.budget_sentence(table.reset_index(), pd.DataFrame([{"confidence": 0.95}]))
    assert "after 8 steps" in text and "Nuclear envelope (+" in text and "Nucleoli reached a PCC of only" in text
    with pytest.raises(ValueError, match="no snapshot of model 'WGAN-GP'"):
        learnability.channel_budget(stage03, snaps, model="WGAN-GP")
