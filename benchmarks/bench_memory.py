"""Peak resident memory of the FOV stages on N and on 3N simulated FOVs. A flat script, not a test.

Every stage must hold one FOV at a time (plus its model), so its peak memory must not grow with the
number of FOVs beyond the per-FOV rows of its tables. This script simulates N FOVs (``01_data``,
synthetic), makes a 3N set from copies of them under new ids, and runs each stage on both sets, each
in a fresh process, reporting the process' peak resident set size (``ru_maxrss``) after its imports
and after the stage:

1. ``02_plls``: :func:`vstain.preprocess.stages.run_focus_stage`;
2. ``03_denoising``: :func:`vstain.preprocess.stages.run_denoise_stage` (a tiny Noise2Void through careamics,
   non-local means on one volume per channel, no BM3D) including the processed set;
3. ``metrics``: :func:`vstain.evaluate.metrics.evaluate_predictions` on the train split, the processed
   clean truth standing in for a model's predictions;
4. ``classifier_patches``: :func:`vstain.evaluate.patches.training_pool` and
   :func:`~vstain.evaluate.patches.scoring_patches` on the train split (the patches themselves
   are kept, so this one may grow with the number of patches);
5. ``classifier_scores``: :func:`~vstain.evaluate.perceptual.score_models` with an untrained
   classifier (the network's answers do not matter here, its memory does).

Usage::

    python benchmarks/bench_memory.py                       # N = 12 FOVs of 32x128x128 (a few minutes)
    python benchmarks/bench_memory.py --n-per-structure 1 --shape 24 64 64 --window 8   # seconds
    python benchmarks/bench_memory.py --json out.json --root /tmp/bench_memory --keep
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's vstain, whatever the environment has installed

STAGES = ("02_plls", "03_denoising", "metrics", "classifier_patches", "classifier_scores")

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--n-per-structure", type=int, default=3, help="simulated FOVs per structure in the N set (>= 3)")
p.add_argument("--factor", type=int, default=3, help="the large set holds this many times the FOVs")
p.add_argument("--shape", type=int, nargs=3, default=[32, 128, 128], help="simulated FOV shape Z Y X")
p.add_argument("--window", type=int, default=16, help="focus window, slices")
p.add_argument("--root", type=str, default=None,
               help="working folder (default: a temporary one); its simulated sets are reused when present")
p.add_argument("--keep", action="store_true", help="keep the working folder")
p.add_argument("--json", type=str, default=None, help="write the measurements here")
p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage in this process
p.add_argument("--sets", type=str, help=argparse.SUPPRESS)
args = p.parse_args()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_stage(stage: str, d: Path) -> None:
    """One stage on the set in ``d`` (imports first, so that their memory is reported apart)."""
    import torch

    from vstain.evaluate import classifier, metrics, patches, perceptual
    from vstain.preprocess import denoise, stages

    torch.set_num_threads(1)
    start = rss_mb()
    t0 = time.perf_counter()
    preds = {"truth": d / "preds"}
    cfg = classifier.ClassifierConfig(patch=(8, 32, 32), pool_per_class=64)
    if stage == "02_plls":
        stages.run_focus_stage(d / "01_data", d / "02_plls", window=args.window)
    elif stage == "03_denoising":
        n2v = denoise.N2VConfig(patch_size=(8, 32, 32), batch_size=8, epochs=2, steps_per_epoch=4, base_width=8,
                                batch_norm=False, learning_rate=3e-3, masked_pixel_percentage=5.0, n_val_patches=4,
                                tile_size=(16, 64, 64), tile_overlap=(4, 16, 16))
        stages.run_denoise_stage(d / "01_data", d / "02_plls", d / "03_denoising", n2v, bm3d_max_volumes=0,
                                     nlm_max_volumes=1)
    elif stage == "metrics":
        metrics.evaluate_predictions(d / "03_denoising", preds, split="train")
    elif stage == "classifier_patches":
        patches.training_pool(d / "03_denoising", cfg, "train")
        patches.scoring_patches(d / "03_denoising", "train", cfg, preds)
    else:
        perceptual.score_models(classifier.build_classifier(cfg), cfg, d / "03_denoising", preds, split="train")
    print(json.dumps({"stage": stage, "rss_start_mb": start, "rss_peak_mb": rss_mb(),
                      "seconds": time.perf_counter() - t0}))


def make_sets(work: Path) -> list[Path]:
    """The N set (simulated) and the factor x N set (copies of the N set's files under new ids)."""
    import pandas as pd

    from vstain.data import stage

    small, large = work / "n", work / "kn"
    if (large / "01_data" / "fovs.csv").exists():  # made by an earlier run with the same --root
        return [small, large]
    stage.run_data_stage(small / "01_data", source="synthetic", n_per_structure=args.n_per_structure,
                        shape=args.shape, seed=0)
    fovs = pd.read_csv(small / "01_data" / "fovs.csv", dtype={"fov_id": str})
    rows = []
    for k in range(args.factor):
        for _, r in fovs.iterrows():
            r = r.copy()
            r["fov_id"] = f"{r['fov_id']}_{k}"
            for col, sub in (("path", "fovs"), ("truth_path", "truth")):
                (large / "01_data" / sub).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(small / "01_data" / r[col], large / "01_data" / sub / f"{r['fov_id']}.tif")
                r[col] = f"{sub}/{r['fov_id']}.tif"
            rows.append(r)
    pd.DataFrame(rows).to_csv(large / "01_data" / "fovs.csv", index=False)
    return [small, large]


def write_predictions(d: Path) -> None:
    """The processed clean truth of every FOV as a model's prediction ``preds/<fov_id>.tif``."""
    import pandas as pd

    man = pd.read_csv(d / "03_denoising" / "manifest.csv", dtype={"fov_id": str})
    (d / "preds").mkdir(exist_ok=True)
    for _, r in man.iterrows():
        shutil.copyfile(d / "03_denoising" / r["truth_path"], d / "preds" / f"{r['fov_id']}.tif")


if args.stage:
    run_stage(args.stage, Path(args.sets))
    sys.exit(0)

if args.n_per_structure < 3:
    sys.exit("--n-per-structure must be at least 3: the processed set puts one FOV per structure in each split")
work = Path(args.root or tempfile.mkdtemp(prefix="bench_memory_"))
work.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
sets = make_sets(work)
one_fov = next((sets[0] / "01_data" / "fovs").iterdir()).stat().st_size / 2**20
print(f"{4 * args.n_per_structure} FOVs of {tuple(args.shape)} ready in {time.perf_counter() - t0:.0f} s; "
      f"one FOV file (7 channels) is {one_fov:.1f} MiB")
env = {**os.environ, "OMP_NUM_THREADS": "1"}
results = []
for stage in STAGES:
    for d in sets:
        if stage == "metrics" and not (d / "preds").exists():
            write_predictions(d)
        out = subprocess.run([sys.executable, __file__, "--stage", stage, "--sets", str(d),
                              "--window", str(args.window)], env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{stage} on {d} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["n_fovs"] = len(list((d / "01_data" / "fovs").iterdir()))
        results.append(r)
        print(f"{stage:<20} {r['n_fovs']:>4} FOVs  RSS after imports {r['rss_start_mb']:7.0f} MiB  "
              f"peak {r['rss_peak_mb']:7.0f} MiB  ({r['seconds']:.0f} s)", flush=True)

print(f"\nstage                peak RSS, MiB: N FOVs -> {args.factor}N FOVs   growth   growth per added FOV")
for stage in STAGES:
    a, b = [r for r in results if r["stage"] == stage]
    grow = b["rss_peak_mb"] - a["rss_peak_mb"]
    print(f"{stage:<20} {a['rss_peak_mb']:8.0f} ({a['n_fovs']}) -> {b['rss_peak_mb']:6.0f} ({b['n_fovs']})  "
          f"{grow:+7.0f}   {grow / (b['n_fovs'] - a['n_fovs']):+6.2f}")
if args.json:
    Path(args.json).write_text(json.dumps({"shape": args.shape, "window": args.window, "results": results}, indent=2))
if not args.keep and not args.root:
    shutil.rmtree(work)
