"""Stage 08_downstream (vstain.evaluate.downstream_stage) on a small simulated processed set: a
perfect model (the clean truth), a model whose channels are shifted in X, and one FOV without labels."""

import shutil

import matplotlib
import numpy as np
import pandas as pd
import pytest

from vstain.channels import LABEL_CHANNELS, TARGETS
from vstain.data.simulate import SimConfig, simulate_fov
from vstain.evaluate import downstream_stage as ds
from vstain.evaluate.stats import format_ci
from vstain.preprocess import processed
from vstain.volumes import read_volume, write_volume

matplotlib.use("Agg")
CFG = SimConfig(shape=(32, 80, 84))  # 24 µm: a few whole cells
PX = CFG.pixel_size
MODELS = ("perfect", "shifted")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Five mito FOVs, three in the test split; predictions of both models for every FOV."""
    root = tmp_path_factory.mktemp("downstream")
    records = []
    for seed in range(5):
        f = simulate_fov(CFG, "mito", seed)
        target = np.full((len(TARGETS), *CFG.shape), np.nan, np.float32)
        for name, key in (("dna", "dna"), ("membrane", "membrane"), ("mito", "struct")):
            target[TARGETS.index(name)] = f[key]
        records.append({"fov_id": f"f{seed}", "gene": "TOMM20", "structure": "mito", "bf": f["brightfield"],
                        "target": target, "truth": f["truth"],
                        "labels": np.stack([f["labels"][c] for c in LABEL_CHANNELS])})
    manifest = processed.write_processed(root / "03", records, seed=0, fractions=(0.2, 0.2, 0.6))
    dirs = {m: root / m for m in MODELS}
    for fid in manifest["fov_id"]:
        truth = read_volume(root / "03" / "processed" / f"{fid}_truth.tif")
        for m, d in dirs.items():
            write_volume(d / f"{fid}.tif", truth if m == "perfect" else np.roll(truth, 5, axis=3))
    tables = ds.run_downstream(root / "03", dirs, PX, split="test")
    return root, dirs, tables


def test_tables_per_fov(run):
    root, dirs, t = run
    inst, plaus, ceiling = t["instances"], t["plausibility"], t["ceiling"]
    assert inst["fov_id"].nunique() == 3 and set(inst["source"]) == {ds.TRUTH, ds.TARGET, *MODELS}
    assert set(inst["object"]) == set(ds.OBJECTS) and set(ds.METRICS) <= set(inst["metric"])
    v = inst.set_index(["fov_id", "source", "object", "metric"])["value"]
    for fid in inst["fov_id"].unique():
        for obj in ds.OBJECTS:
            # the perfect model is the clean truth: segmented the same way, scored the same
            assert v[fid, "perfect", obj, "f1"] == v[fid, ds.TRUTH, obj, "f1"]
            assert v[fid, ds.TRUTH, obj, "mean_iou"] > v[fid, "shifted", obj, "mean_iou"]
            assert v[fid, "shifted", obj, "abs_count_error"] == abs(v[fid, "shifted", obj, "count_error"])
    assert np.mean([v[f, ds.TRUTH, "nuclei", "f1"] for f in inst["fov_id"].unique()]) > 0.8, "segmenting the clean truth"
    # plausibility: only the channels a FOV carries no label for, for the truth and the models
    assert set(plaus["channel"]) == {"envelope", "actomyosin", "nucleoli"}
    assert set(plaus["source"]) == {ds.TRUTH, *MODELS} and len(plaus) == 3 * 3 * 3
    p = plaus.groupby(["source", "channel"])["value"].mean()
    assert p["perfect", "nucleoli"] == p[ds.TRUTH, "nucleoli"] > 0.9 > p["shifted", "nucleoli"]
    # the ceiling: the labelled channels only, a PCC below 1 (camera noise) and above 0
    assert set(ceiling["channel"]) == {"dna", "membrane", "mito"} and len(ceiling) == 9
    assert ((ceiling["value"] > 0.3) & (ceiling["value"] < 1)).all()


def test_a_fov_without_labels_or_truth(run):
    root, dirs, _ = run
    row = processed.read_manifest(root / "03").iloc[0].copy()
    row["labels_path"] = ""
    t = ds.fov_tables(row, dirs, PX)
    assert t["instances"].empty and t["plausibility"].empty and len(t["ceiling"]) == 3
    row["truth_path"] = ""
    assert ds.fov_tables(row, dirs, PX)["ceiling"].empty


def test_a_prediction_of_another_shape_is_an_error(run, tmp_path):
    root, dirs, _ = run
    row = processed.read_manifest(root / "03").iloc[0]
    write_volume(tmp_path / f"{row['fov_id']}.tif", np.zeros((6, 24, 80, 84), np.float32))
    with pytest.raises(ValueError, match=r"does not match the processed FOV \(6, 32, 80, 84\)"):
        ds.fov_tables(row, {"bad": tmp_path}, PX)


def test_summary_comparison_and_narrative(run):
    _, _, t = run
    inst = t["instances"]
    sources = [ds.TRUTH, ds.TARGET, *MODELS]
    s = ds.summarise(inst, sources, n_resamples=999)
    assert list(dict.fromkeys(s["object"])) == ["nuclei", "cells"]
    assert list(dict.fromkeys(s["source"])) == sources and list(dict.fromkeys(s["metric"])) == list(ds.METRICS)
    assert (s.loc[s["metric"] != "volume_error", "n"] == 3).all()  # no match, no volume error
    row = s[(s["object"] == "cells") & (s["source"] == "shifted") & (s["metric"] == "mean_iou")].iloc[0]
    per_fov = inst[(inst["object"] == "cells") & (inst["source"] == "shifted") & (inst["metric"] == "mean_iou")]
    assert row["estimate"] == pytest.approx(per_fov["value"].mean()) and row["ci_low"] <= row["estimate"]
    cmp = ds.compare_models(inst, MODELS, n_resamples=999)
    assert len(cmp) == 2 * len(ds.METRICS) and (cmp.loc[cmp["metric"] != "volume_error", "n"] == 3).all()
    f1 = cmp[(cmp["object"] == "nuclei") & (cmp["metric"] == "mean_iou")].iloc[0]
    assert f1["diff"] < 0 and f1["better"] == "none"  # shifted is worse, but 3 FOVs cannot decide
    text = ds.narrative(s, cmp, t["plausibility"], "perfect", "shifted")
    assert "cannot be decided with n = 3 FOVs" in text and "**" in text
    assert format_ci(*s[(s["object"] == "nuclei") & (s["source"] == ds.TRUTH) & (s["metric"] == "f1")]
                     .iloc[0][["estimate", "ci_low", "ci_high"]], 3) in text
    table = ds.display_table(s)
    assert table.shape == (2 * len(sources), len(ds.METRICS)) and "(n = 3)" in table.iloc[0, 0]
    plaus = ds.display_table(ds.summarise(t["plausibility"], [ds.TRUTH, *MODELS], by="channel", metrics=None,
                                          n_resamples=999),
                             by="channel")
    assert list(plaus.index) == ["Nuclear envelope", "Actomyosin bundles", "Nucleoli"]
    assert list(plaus.columns) == [ds.TRUTH, *MODELS]
    assert ds.narrative(ds.summarise(pd.DataFrame(), sources), cmp, t["plausibility"], "a", "b").startswith("No FOV")


def test_model_pcc_reads_07_or_computes(run, tmp_path):
    root, dirs, t = run
    computed = ds.model_pcc(root / "03", dirs)
    assert set(computed["source"]) == set(MODELS) and (computed["metric"] == "pcc").all()
    perfect = computed[computed["source"] == "perfect"].set_index(["fov_id", "channel"])["value"]
    ceiling = t["ceiling"].set_index(["fov_id", "channel"])["value"]
    assert np.allclose(perfect.sort_index(), ceiling.sort_index())  # the truth's PCC is the ceiling
    written = computed.rename(columns={"source": "model"}).assign(value=0.5)
    written.to_csv(tmp_path / "pixel_metrics.csv", index=False)
    assert (ds.model_pcc(root / "03", dirs, pixel_metrics=tmp_path / "pixel_metrics.csv")["value"] == 0.5).all()
    # a file without every model is not used
    written[written["model"] == "perfect"].to_csv(tmp_path / "pixel_metrics.csv", index=False)
    assert ds.model_pcc(root / "03", dirs, pixel_metrics=tmp_path / "pixel_metrics.csv")["value"].ne(0.5).all()


def test_figures(run):
    from vstain.plots import downstream as plots

    root, dirs, t = run
    row = processed.read_manifest(root / "03").iloc[0]
    volumes, labels = ds.fov_volumes(row, dirs)
    segmented = ds.segment_sources(volumes, PX)
    fig = plots.segmentation_outlines(volumes, ds.true_instances(labels), segmented, PX, "FOV")
    assert len(fig.axes) == 2 * 4 + 2  # two objects x four sources, and a colour bar per object
    fig = plots.score_intervals(ds.summarise(t["instances"], [ds.TRUTH, *MODELS], n_resamples=99))
    assert len(fig.axes) == 4


def test_segment_sources_skips_unlabelled_channels():
    f = simulate_fov(SimConfig(shape=(32, 30, 34)), "mito", 1)
    no_mem = f["truth"].copy()
    no_mem[TARGETS.index("membrane")] = np.nan
    no_dna = f["truth"].copy()
    no_dna[TARGETS.index("dna")] = np.nan
    seg = ds.segment_sources({"full": f["truth"], "no membrane": no_mem, "no dna": no_dna}, PX)
    assert set(seg) == {"full", "no membrane"} and set(seg["no membrane"]) == {"nuclei"}
    assert np.array_equal(seg["full"]["nuclei"], seg["no membrane"]["nuclei"])


def test_a_run_without_labels_gives_empty_tables_and_says_so(run, tmp_path):
    """Real data: no FOV has true labels; the stage still scores the noise ceiling and says why the
    segmentation is missing."""
    root, dirs, _ = run
    shutil.copytree(root / "03", tmp_path / "03")
    manifest = pd.read_csv(tmp_path / "03" / processed.MANIFEST_CSV, dtype={"fov_id": str})
    manifest.assign(labels_path="").to_csv(tmp_path / "03" / processed.MANIFEST_CSV, index=False)
    t = ds.run_downstream(tmp_path / "03", dirs, PX)
    assert t["instances"].empty and t["plausibility"].empty and len(t["ceiling"]) == 9
    s = ds.summarise(t["instances"], [ds.TRUTH, *MODELS])
    cmp = ds.compare_models(t["instances"], MODELS)
    assert s.empty and cmp.empty
    assert ds.narrative(s, cmp, t["plausibility"], *MODELS).startswith("No FOV of this split carries true")
