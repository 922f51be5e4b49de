"""Does training in bf16 autocast change the book's U-Net more than a second seed does?

Four trainings of ``04_unet`` with the book profile's settings, differing only in ``precision``
(``32-true``, ``bf16-mixed``) and ``seed`` (0, 1), are scored on the test FOVs against the
measured targets and the clean simulated truth. For every channel and metric:

- the *precision effect*: per FOV, the mean over both seeds of bf16 minus the mean of float32,
  a paired interval over FOVs (:func:`vstain.evaluate.stats.compare`);
- the *seed spread*: the float32 U-Net of seed 1 against that of seed 0, the yardstick the study's
  verdicts use (``07b_seed_spread``).

The precision effect is a finding in the study's own sense (:func:`vstain.evaluate.stats.is_finding`)
when its interval excludes zero *and* its mean exceeds the farthest end of the seed spread's
interval. bf16 is fit for the book's trainings when no cell is a finding: changing the precision
then moves the results less than training once more with another seed. The rule is lenient in
one way: the precision effect is a mean over two seeds, so it carries about half the trajectory
noise of the one seed pair it is measured against. Each folder's ``manifest.json`` must record the
precision and seed it is given as. A flat script, not a test.

Usage::

    python benchmarks/bf16_vs_seed.py --stage runs/book/03_denoising \\
        --fp32 /tmp/fp32_s0/04_unet /tmp/fp32_s1/04_unet --bf16 runs/book/04_unet /tmp/bf16_s1/04_unet

(each folder a ``04_unet`` stage trained with the book profile on that ``03_denoising``, its
``precision`` and ``seed`` changed as named: ``python -m vstain.book.pipeline --only 04_unet`` with
a copy of ``profiles/book.yaml`` and ``VSTAIN_RUNS`` pointing at a folder that links 01-03).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from vstain.book import rundir
from vstain.evaluate import metrics, stats

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--stage", required=True, help="the 03_denoising stage folder the four were trained on")
p.add_argument("--fp32", nargs=2, required=True, metavar=("SEED0", "SEED1"), help="04_unet folders, float32")
p.add_argument("--bf16", nargs=2, required=True, metavar=("SEED0", "SEED1"), help="04_unet folders, bf16 autocast")
p.add_argument("--out", default=None, help="CSV of the table (default: print only)")
args = p.parse_args()

runs = {"fp32_s0": args.fp32[0], "fp32_s1": args.fp32[1], "bf16_s0": args.bf16[0], "bf16_s1": args.bf16[1]}
expected = {"fp32_s0": ("32-true", 0), "fp32_s1": ("32-true", 1), "bf16_s0": ("bf16-mixed", 0), "bf16_s1": ("bf16-mixed", 1)}
for name, d in runs.items():
    if not (Path(d) / "predictions").is_dir():
        raise SystemExit(f"{name}: {d} has no predictions/ folder (a finished 04_unet stage is needed)")
    params = rundir.load_manifest(d)["params"]
    if (params.get("precision"), params.get("seed")) != expected[name]:
        raise SystemExit(f"{name}: {d} was trained with precision={params.get('precision')!r}, seed={params.get('seed')!r}; "
                         f"expected {expected[name]}")

tables = []
for reference in ("target", "truth"):
    long = metrics.evaluate_predictions(args.stage, {k: Path(d) / "predictions" for k, d in runs.items()},
                                        split="test", reference=reference)
    bad = long[~np.isfinite(long["value"])]
    if len(bad):
        raise SystemExit(f"non-finite {reference} scores, e.g. {bad.iloc[0].to_dict()}: a model predicted NaN or inf")
    wide = long.pivot(index=["fov_id", "channel", "metric"], columns="model", values="value").reset_index()
    # per FOV: the seeds' mean in each precision, so the effect of precision is not one trajectory's
    wide["fp32"] = (wide["fp32_s0"] + wide["fp32_s1"]) / 2
    wide["bf16"] = (wide["bf16_s0"] + wide["bf16_s1"]) / 2
    both = wide.melt(id_vars=["fov_id", "channel", "metric"], value_vars=["fp32", "bf16", "fp32_s0", "fp32_s1"],
                     var_name="model", value_name="value").dropna(subset=["value"])
    hib = metrics.HIGHER_IS_BETTER
    precision = stats.compare(both, "fp32", "bf16", higher_is_better=hib)
    seed = stats.compare(both, "fp32_s0", "fp32_s1", higher_is_better=hib)
    judged = stats.against_seed(precision, seed)
    judged.insert(0, "reference", reference)
    judged["seed_diff"] = seed.set_index(["channel", "metric"])["diff"].reindex(
        pd.MultiIndex.from_frame(judged[["channel", "metric"]])).to_numpy()
    tables.append(judged)

table = pd.concat(tables, ignore_index=True)
cols = ["reference", "channel", "metric", "n", "mean_a", "mean_b", "diff", "ci_low", "ci_high",
        "seed_diff", "seed_reach", "finding"]
with pd.option_context("display.width", 200, "display.max_rows", 200):
    print(table[cols].round(4).to_string(index=False))
n_find = int(table["finding"].sum())
print(f"\n{len(table)} cells (channel x metric x reference); precision effect beyond the seed spread in {n_find}:",
      "bf16 fits the book's trainings" if n_find == 0 else "bf16 moves results more than a second seed")
if args.out:
    table.to_csv(args.out, index=False)
