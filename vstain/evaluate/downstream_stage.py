"""Stage ``08_downstream``: what the predictions are good for, on the test FOVs of a simulated run.

Data flow: the processed set (``03_denoising``: the clean truth, the measured target and the true
instance labels of every FOV, :func:`vstain.preprocess.processed.load_labels`) and each model's predictions
(``<stage>/predictions/<fov_id>.tif``) -> per FOV (:func:`fov_tables`): nuclei from DNA and cells
from membrane segmented the same way (:mod:`vstain.evaluate.segment`) from the clean truth (the
pipeline's ceiling), the measured target and every prediction, each matched with the true instances
(:func:`vstain.evaluate.downstream.instance_table`); the plausibility of the channels the FOV carries
no label for; the noise ceiling of the labelled channels -> over FOVs (:func:`run_downstream`) ->
means with bootstrap intervals and paired comparisons (:func:`summarise`, :func:`compare_models`,
reusing :mod:`vstain.evaluate.comparison` and :mod:`vstain.evaluate.stats`) -> the tables shown
(:func:`display_table`) and the sentences generated from them (:func:`narrative`).

Tables are long: ``fov_id, structure, source, object, metric, value`` (instances),
``fov_id, structure, source, channel, metric, value`` (plausibility, PCC and the noise ceiling).
"""
from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from vstain.channels import LABEL_CHANNELS, TARGET_LABELS, TARGETS
from vstain.preprocess.processed import load_fov, load_labels, read_manifest
from vstain.volumes import read_volume

from .comparison import model_summary
from .downstream import instance_table, noise_ceiling, plausibility
from .fovpool import map_fovs
from .metrics import evaluate_predictions
from .segment import segment_cells, segment_nuclei
from .stats import channel_verdict, claim_verdict, compare, format_ci, n_fovs, order_digits

TRUTH, TARGET, CEILING = "truth", "target", "noise ceiling"  # sources beside the models
OBJECTS = {"nuclei": "dna", "cells": "membrane"}  # object -> the channel it is segmented from
METRICS = ("mean_iou", "f1", "f1_mean", "abs_count_error", "volume_error")  # the table's columns
HIGHER_IS_BETTER = {"mean_iou": True, "f1": True, "f1_mean": True, "abs_count_error": False, "volume_error": False}
METRIC_LABELS = {"mean_iou": "mean IoU", "f1": "F1 (IoU 0.5)", "f1_mean": "F1 (IoU 0.5-0.9)",
                 "abs_count_error": "|count error|", "volume_error": "volume error", "plausibility": "in compartment",
                 "pcc": "PCC"}
CLAIM_METRICS = ("mean_iou", "f1", "f1_mean")  # "segments better": the matching scores of both objects


def segment_sources(volumes: Mapping[str, np.ndarray], voxel_size_zyx: Sequence[float]) -> dict[str, dict]:
    """Nuclei and cells of every source, segmented the same way (:func:`segment_nuclei` on DNA,
    :func:`segment_cells` on membrane seeded by those nuclei).

    Args:
        volumes: source name -> ``[6, Z, Y, X]`` in TARGETS order (clean truth, measured target or a
            prediction; any positive affine scale). A source whose DNA channel is all NaN is left
            out; one whose membrane is all NaN gets nuclei only.
        voxel_size_zyx: voxel size in µm.

    Returns:
        source -> ``{"nuclei": int32 [Z, Y, X], "cells": int32 [Z, Y, X]}``.
    """
    dna, mem = TARGETS.index(OBJECTS["nuclei"]), TARGETS.index(OBJECTS["cells"])
    out = {}
    for source, vol in volumes.items():
        if vol is None or np.isnan(vol[dna]).all():
            continue
        nuclei = segment_nuclei(vol[dna], voxel_size_zyx)
        out[source] = {"nuclei": nuclei}
        if not np.isnan(vol[mem]).all():
            out[source]["cells"] = segment_cells(vol[mem], nuclei, voxel_size_zyx=voxel_size_zyx)
    return out


def true_instances(labels: np.ndarray) -> dict[str, np.ndarray]:
    """``{"nuclei": ..., "cells": ...}`` of the uint16 ``[2, Z, Y, X]`` true labels."""
    return {name: labels[LABEL_CHANNELS.index(name)] for name in OBJECTS}


def fov_volumes(row, pred_dirs: Mapping[str, str | Path]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The sources of one processed FOV: ``{"truth", "target", <model>...}`` ``[6, Z, Y, X]`` (no
    ``truth`` on real data) and its true labels ``[2, Z, Y, X]`` (None on real data)."""
    _, target, truth = load_fov(row)
    volumes = {TRUTH: truth} if truth is not None else {}
    volumes[TARGET] = target
    for model, d in pred_dirs.items():
        volumes[model] = read_volume(Path(d) / f"{row['fov_id']}.tif")
        if volumes[model].shape != target.shape:
            raise ValueError(f"{d}/{row['fov_id']}.tif: prediction {volumes[model].shape} does not match the "
                             f"processed FOV {target.shape}: rerun the model stage on this processed set")
    return volumes, load_labels(row)


def fov_tables(row, pred_dirs: Mapping[str, str | Path], voxel_size_zyx: Sequence[float],
               exclude_edge: bool = False) -> dict[str, pd.DataFrame]:
    """The three long tables of one processed FOV.

    ``instances``: :func:`instance_table` of every source against the true labels, plus
    ``abs_count_error`` (``|n_pred - n_true|``); ``plausibility``: the fraction of each unlabelled
    channel's signal in its compartment of the true labels (clean truth and models); ``ceiling``:
    the PCC of the measured target with the clean truth per labelled channel. A FOV without true
    labels gives empty instance and plausibility tables; one without clean truth no ceiling.

    Args:
        row: a processed-set manifest row (:func:`vstain.preprocess.processed.read_manifest`).
        pred_dirs: model name -> folder of ``<fov_id>.tif`` predictions ``[6, Z, Y, X]``.
        voxel_size_zyx: voxel size in µm (:func:`vstain.data.stage.voxel_size`).
        exclude_edge: drop instances that touch the FOV's lateral border, as the Allen single-cell
            dataset drops edge cells (a cut cell may have no nucleus in the FOV). Default False: a
            FOV of a few cells across has almost no cell off its border.
    """
    volumes, labels = fov_volumes(row, pred_dirs)
    fid, structure = row["fov_id"], row["structure"]
    key = {"fov_id": fid, "structure": structure}
    ceiling = pd.DataFrame([{**key, "source": CEILING, "channel": c, "metric": "pcc", "value": v}
                            for c, v in (noise_ceiling(volumes[TARGET], volumes[TRUTH]).items()
                                         if TRUTH in volumes else ())])
    if labels is None:
        return {"instances": pd.DataFrame(), "plausibility": pd.DataFrame(), "ceiling": ceiling}
    true = true_instances(labels)
    inst = instance_table(fid, true, segment_sources(volumes, voxel_size_zyx), exclude_edge)
    counts = inst[inst["metric"] == "count_error"].assign(metric="abs_count_error")
    inst = pd.concat([inst, counts.assign(value=counts["value"].abs())], ignore_index=True)
    inst.insert(1, "structure", structure)
    unlabelled = [c for i, c in enumerate(TARGETS) if np.isnan(volumes[TARGET][i]).all()]
    plaus = [{**key, "source": s, "channel": c, "metric": "plausibility", "value": v}
             for s, vol in volumes.items() if s != TARGET
             for c, v in plausibility(vol, true["nuclei"], true["cells"], voxel_size_zyx).items() if c in unlabelled]
    return {"instances": inst, "plausibility": pd.DataFrame(plaus), "ceiling": ceiling}


def run_downstream(stage_in: str | Path, pred_dirs: Mapping[str, str | Path], voxel_size_zyx: Sequence[float],
                   split: str = "test", exclude_edge: bool = False) -> dict[str, pd.DataFrame]:
    """:func:`fov_tables` of every FOV of one split of the processed set, concatenated (FOVs in
    threads, :func:`vstain.evaluate.fovpool.map_fovs`). Returns ``{"instances", "plausibility",
    "ceiling"}``; ``instances`` is empty when no FOV has true labels (real data)."""
    df = read_manifest(stage_in)
    df = df[df["split"] == split]
    if df.empty:
        raise ValueError(f"the processed set at {stage_in} has no FOV in split '{split}'")
    parts = map_fovs(lambda r: fov_tables(r, pred_dirs, voxel_size_zyx, exclude_edge), [r for _, r in df.iterrows()])
    return {k: pd.concat([p[k] for p in parts], ignore_index=True) for k in ("instances", "plausibility", "ceiling")}


def model_pcc(stage_in: str | Path, pred_dirs: Mapping[str, str | Path], split: str = "test",
              pixel_metrics: str | Path | None = None) -> pd.DataFrame:
    """Each model's PCC against the measured target per FOV and labelled channel
    (``fov_id, structure, source, channel, metric, value``): read from 07_results'
    ``pixel_metrics.csv`` where it exists and holds every model, else computed
    (:func:`vstain.evaluate.metrics.evaluate_predictions`)."""
    long = None
    if pixel_metrics is not None and Path(pixel_metrics).exists():
        long = pd.read_csv(pixel_metrics, dtype={"fov_id": str})
        if not set(pred_dirs) <= set(long["model"]):
            long = None
    if long is None:
        long = evaluate_predictions(stage_in, dict(pred_dirs), split=split, reference="target")
    long = long[(long["metric"] == "pcc") & long["model"].isin(list(pred_dirs))]
    return long.rename(columns={"model": "source"})[["fov_id", "structure", "source", "channel", "metric", "value"]]


# ------------------------------------------------------------------------------ over FOVs


def _as_values(long: pd.DataFrame, by: str) -> pd.DataFrame:
    """A stage table in the layout of :mod:`vstain.evaluate.comparison` (``model``, ``channel``)."""
    return long.rename(columns={"source": "model", by: "channel"})


def summarise(long: pd.DataFrame, sources: Sequence[str], by: str = "object", metrics: Sequence[str] | None = METRICS,
              n_resamples: int = 9999, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Each source's mean over FOVs with its bootstrap interval per ``by`` (``object`` or
    ``channel``) and metric (:func:`vstain.evaluate.comparison.model_summary`): ``<by>, source,
    metric, estimate, ci_low, ci_high, n`` (n = FOVs with a finite value), in the order of
    ``sources``. ``metrics``: the metrics kept (default :data:`METRICS`; None: all)."""
    if metrics is not None and not long.empty:
        long = long[long["metric"].isin(metrics)]
    if long.empty:
        return pd.DataFrame(columns=[by, "source", "metric", "estimate", "ci_low", "ci_high", "n"])
    s = model_summary(_as_values(long, by).dropna(subset=["value"]), None, list(sources), n_resamples, confidence,
                      seed)
    s = s.rename(columns={"model": "source", "channel": by})
    known = [*OBJECTS, *TARGETS]  # objects, then channels, in their project order
    s["_k"] = [known.index(v) if v in known else len(known) for v in s[by]]
    s["_o"] = s["source"].map({m: i for i, m in enumerate(sources)})
    s["_m"] = s["metric"].map({m: i for i, m in enumerate(metrics or dict.fromkeys(s["metric"]))})
    return s.sort_values(["_k", "_o", "_m"], kind="stable").drop(columns=["_k", "_o", "_m"]).reset_index(drop=True)


def compare_models(instances: pd.DataFrame, models: Sequence[str], n_resamples: int = 9999,
                   confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Paired differences ``b - a`` of every pair of ``models`` on every object and metric of
    :data:`METRICS` (:func:`vstain.evaluate.stats.compare`: paired bootstrap and Wilcoxon over FOVs;
    ``better`` names a winner only with enough FOVs)."""
    if instances.empty:  # no FOV with true labels
        return pd.DataFrame()
    long = instances[instances["metric"].isin(METRICS)].rename(columns={"source": "model"})
    frames = [compare(long, a, b, higher_is_better=HIGHER_IS_BETTER, by=("object", "metric"),
                      n_resamples=n_resamples, confidence=confidence, seed=seed) for a, b in combinations(models, 2)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def display_table(summary: pd.DataFrame, by: str = "object", metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """A summary as strings ``"0.93 [0.91, 0.95] (n = 4)"``: rows ``(<by>, source)``, one column per
    metric (or, with one metric, per source and rows ``<by>``), one number of decimals per column
    and ``by`` value so that no two sources' numbers merge."""
    if summary.empty:
        return pd.DataFrame()
    metrics = list(metrics or dict.fromkeys(summary["metric"]))
    s = summary[summary["metric"].isin(metrics)]
    digits = {k: order_digits(pd.concat([g["estimate"], g["ci_low"], g["ci_high"]]).tolist() + [0.0])
              for k, g in s.groupby([by, "metric"])}
    cells = s.assign(text=[format_ci(r.estimate, r.ci_low, r.ci_high, int(r.n), digits[(getattr(r, by), r.metric)])
                           for r in s.itertuples()])
    names = {**TARGET_LABELS, **{o: o.capitalize() for o in OBJECTS}}
    cells[by] = cells[by].map(lambda v: names.get(v, v))
    if len(metrics) == 1:
        table = cells.pivot(index=by, columns="source", values="text")
        return table.reindex(index=list(dict.fromkeys(cells[by])), columns=list(dict.fromkeys(cells["source"])))
    table = cells.pivot(index=[by, "source"], columns="metric", values="text")
    table = table.reindex(index=pd.MultiIndex.from_frame(cells[[by, "source"]].drop_duplicates()), columns=metrics)
    return table.rename(columns=METRIC_LABELS).fillna("–")


def _cell(summary: pd.DataFrame, obj: str, source: str, metric: str) -> str:
    r = summary[(summary["object"] == obj) & (summary["source"] == source) & (summary["metric"] == metric)]
    return "not scored" if r.empty else format_ci(*r.iloc[0][["estimate", "ci_low", "ci_high"]], int(r.iloc[0]["n"]))


def narrative(summary: pd.DataFrame, comparisons: pd.DataFrame, plaus: pd.DataFrame, pixel_model: str,
              adversarial_model: str, confidence: float = 0.95) -> str:
    """The sentences of the stage, generated from the numbers: the ceiling (segmented from the clean
    truth), which of ``pixel_model`` and ``adversarial_model`` segments nuclei and cells better on
    F1 at IoU 0.5 and mean IoU (paired interval and n, or "no detectable difference"), whether
    "the adversarial model's structures are more realistic" holds when read as "they segment
    better" on most of :data:`CLAIM_METRICS` for both objects, and the plausibility of each beside
    the clean truth's (Markdown)."""
    if summary.empty:
        return "No FOV of this split carries true instance labels (real data): nothing to segment against."
    a, b = pixel_model, adversarial_model
    lines = []
    for obj in OBJECTS:
        lines.append(f"- **{obj.capitalize()}**: segmented from the clean truth, F1 at IoU 0.5 is "
                     f"{_cell(summary, obj, TRUTH, 'f1')} (the ceiling of this segmentation); from the measured "
                     f"target {_cell(summary, obj, TARGET, 'f1')}; {a} {_cell(summary, obj, a, 'f1')}, "
                     f"{b} {_cell(summary, obj, b, 'f1')}.")
    pair = comparisons[comparisons["model_a"].isin([a, b]) & comparisons["model_b"].isin([a, b])] \
        if len(comparisons) else comparisons
    if pair.empty:
        return "\n".join(lines + ["", f"{a} and {b} were not both scored: no paired comparison."])
    lines.append("")
    for _, r in pair[pair["metric"].isin(("f1", "mean_iou"))].iterrows():
        lines.append(f"- {r['object'].capitalize()}, {METRIC_LABELS[r['metric']]}: {r['model_b']} minus "
                     f"{r['model_a']} {format_ci(r['diff'], r['ci_low'], r['ci_high'], int(r['n']))}, "
                     f"Wilcoxon p = {r['p']:.2g}: {channel_verdict(r, confidence=confidence)}.")
    cells = pair[pair["metric"].isin(CLAIM_METRICS)]
    claim = claim_verdict(cells, b, "most")
    lines += ["", f"Read as \"the {b}'s nuclei and cells segment better\" (more than half of the cells mean IoU, "
                  f"F1 at 0.5 and F1 over 0.5-0.9 of both objects, {n_fovs(cells['n'])}), the thesis' claim that "
                  f"the {b}'s structures are more realistic **{claim}** in this run."]
    if len(plaus):
        mean = plaus.groupby("source")["value"].mean()
        shown = ", ".join(f"{s} {mean[s]:.2f}" for s in [TRUTH, a, b] if s in mean)
        lines.append(f"Of the signal predicted in the channels a FOV carries no label for, the fraction in the right "
                     f"compartment of the true cells averages {shown} (clean truth first; mean over channels and FOVs).")
    return "\n".join(lines)
