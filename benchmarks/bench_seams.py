"""Seams of tiled prediction: per-tile against whole-volume instance-norm statistics. A flat script,
not a test (pytest never collects it).

Predicts one volume with a seeded, randomly initialised generator (or a trained one, ``--model``) in
one pass and in tiles with both normalisations of :func:`vstain.inference.infer.predict_volume` (``norm="tile"``: each tile's own
statistics, Gaussian blending; ``norm="volume"``: layer by layer with whole-volume statistics) and
prints, per mode, the seam figures of :func:`vstain.inference.infer.seam_figures` (per-channel correlation
with the one-pass prediction, max / mean absolute difference, also relative to the channel's
largest value, and the ratio of the mean difference on tile-border planes to that elsewhere) and
the wall times. The input is a simulated brightfield FOV (:func:`vstain.data.simulate.simulate_fov`),
z-scored as the processed set is.

``--big`` predicts a real-size 64x624x924 FOV at the thesis' width 64 under the default memory
budget (tiled, ``--modes`` picks the normalisation) and prints its time, the process's peak resident
memory during the prediction (Linux; input, network and output included) and the scratch files'
peak size; no one-pass comparison (it would not fit the budget).

Usage::

    nice -n 19 python benchmarks/bench_seams.py                      # 32x384x384, width 16, 128x128 tiles
    python benchmarks/bench_seams.py --model runs/book/04_unet       # the same with the book's trained U-Net
    python benchmarks/bench_seams.py --quick [--big]                 # seconds: checks that the script runs
    nice -n 19 python benchmarks/bench_seams.py --big --modes volume # one pass of ~67 TFLOP + ~100 GB disk traffic
    nice -n 19 python benchmarks/bench_seams.py --big --modes tile   # ~120 TFLOP (tile overlap 0.25)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import numpy as np
import torch
from peaks import Peak, folder_bytes

from vstain.data.simulate import SimConfig, simulate_fov
from vstain.inference.infer import NORMS, default_max_voxels, default_roi, predict_volume, seam_figures, tile_borders
from vstain.modelfiles import load_generator
from vstain.models import Generator, GeneratorConfig

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--size", type=str, default="32x384x384", help="volume ZxYxX (the thesis' crop)")
p.add_argument("--width", type=int, default=16, help="generator base width (book profile 16, thesis 64)")
p.add_argument("--roi", type=int, nargs=2, default=[128, 128], help="tile Y X; tiles keep the whole Z range")
p.add_argument("--overlap", type=float, default=0.25, help="norm=tile: fraction of a tile shared with a neighbour")
p.add_argument("--workdir", type=str, default=None, help="norm=volume: folder for the scratch files")
p.add_argument("--modes", nargs="+", default=list(NORMS), choices=NORMS, help="tile normalisations to measure")
p.add_argument("--seed", type=int, default=0, help="seed of the generator's weights and of the simulated FOV")
p.add_argument("--model", type=str, default="", help="a trained 04_unet / 05_wgan stage folder instead of random weights")
p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
p.add_argument("--big", action="store_true", help="64x624x924 at width 64 under the default budget: time, peak RSS")
p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
p.add_argument("--json", type=str, default="", help="also write the results to this JSON file")
args = p.parse_args()
if args.quick:
    args.size, args.width, args.roi = "24x96x80", 4, [48, 48]
if args.big and not args.quick:
    args.size, args.width = "64x624x924", 64
if args.threads:
    torch.set_num_threads(args.threads)
zyx = tuple(int(s) for s in args.size.lower().split("x"))


def brightfield(zyx, seed: int) -> np.ndarray:
    """A simulated brightfield FOV of shape ``zyx``, z-scored: ``[1, Z, Y, X]`` float32."""
    bf = simulate_fov(SimConfig(shape=zyx), "mito", seed)["brightfield"].astype(np.float32)
    return ((bf - bf.mean()) / bf.std())[None]


def timed_predict(gen, x, **kw) -> tuple[np.ndarray, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiling notice; the mode is reported here
        t = time.perf_counter()
        out = predict_volume(gen, x, **kw)
    return out, time.perf_counter() - t


def reset_peak_rss() -> float:
    """Start a new peak-resident-memory measurement (Linux: writing 5 to /proc/self/clear_refs
    resets VmHWM) and return the resident memory now, GiB."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return proc_status("VmRSS")


def proc_status(key: str) -> float:
    """A memory figure of /proc/self/status (VmRSS, VmHWM), GiB."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":")) / 2**20


torch.manual_seed(args.seed)
gen = load_generator(args.model) if args.model else Generator(GeneratorConfig(base_width=args.width)).eval()
args.width = gen.cfg.base_width
t = time.perf_counter()
x = brightfield(zyx, args.seed)
print(f"simulated brightfield {args.size} in {time.perf_counter() - t:.1f} s; generator width {args.width}, "
      f"{torch.get_num_threads()} threads")
results: dict = {"size": list(zyx), "width": args.width, "model": args.model or "random", "overlap": args.overlap, "seed": args.seed,
                 "threads": torch.get_num_threads(), "torch": torch.__version__, "modes": {}}

if args.big:
    max_voxels = default_max_voxels(gen) if not args.quick else 24 * 48 * 48  # --quick: tiles of 48x48
    for norm in args.modes:
        roi = default_roi(zyx, max_voxels, all_z=norm == "volume")  # the tile predict_volume uses
        workdir = tempfile.mkdtemp(prefix="bench-seams-", dir=args.workdir)
        before = reset_peak_rss()
        kw = {"workdir": workdir, "progress": True} if norm == "volume" else {"overlap": args.overlap}
        with Peak(lambda: folder_bytes(workdir), every=0.5) as disk:
            out, dt = timed_predict(gen, x, max_voxels=max_voxels, norm=norm, **kw)
        os.rmdir(workdir)
        peak = proc_status("VmHWM")
        results["modes"][norm] = {"roi": list(roi), "seconds": round(dt, 1), "rss_before_gib": round(before, 2),
                                  "peak_rss_gib": round(peak, 2), "peak_scratch_gib": round(disk.peak / 2**30, 2)}
        print(f"{norm:6s} tiles {roi}: {dt:.0f} s, peak RSS {peak:.2f} GiB during the prediction "
              f"({before:.2f} GiB before it: input, network), scratch files at most {disk.peak / 2**30:.2f} GiB")
else:
    roi = (zyx[0], *args.roi)
    whole, t_whole = timed_predict(gen, x, max_voxels=np.iinfo(np.int64).max)
    results["whole_seconds"] = round(t_whole, 2)
    print(f"whole  one pass: {t_whole:.1f} s")
    print(f"{'mode':6s} {'corr min':>9s} {'max|d|':>8s} {'max rel':>8s} {'mean rel':>9s} {'border/int':>10s} "
          f"{'seconds':>8s} {'x whole':>7s}")
    for norm in args.modes:
        overlap = args.overlap if norm == "tile" else None  # whole-volume statistics need no overlap
        tiled, dt = timed_predict(gen, x, max_voxels=0, roi_size=roi, overlap=overlap, norm=norm)
        f = seam_figures(whole, tiled, tile_borders(zyx, roi, args.overlap, norm))
        results["modes"][norm] = {**{k: v.tolist() for k, v in f.items()}, "seconds": round(dt, 2)}
        print(f"{norm:6s} {f['corr'].min():9.6f} {f['max_abs'].max():8.1e} {f['max_rel'].max():8.1e} "
              f"{f['mean_rel'].max():9.1e} {f['border_ratio'].max():10.3f} {dt:8.1f} {dt / t_whole:7.1f}")
    print(f"(per channel, worst of {len(whole)}; tiles {roi}, overlap {args.overlap} for tile; "
          f"relative to the channel's largest |value| in the one-pass prediction)")

if args.json:
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=2)
    print("wrote", args.json)
