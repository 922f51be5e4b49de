"""Benchmark of the U-Net generator on this machine (issue 4, item 8). A flat script, not a test.

Measures
1. the machine's dense fp32 matmul rate (``torch.mm`` of large square matrices, best of several);
2. the training step (forward + masked-L1 backward + Adam) at the thesis' width (64) and the book
   profile's width: voxels per second, FLOPs per step counted with
   ``torch.utils.flop_counter.FlopCounterMode``, and the achieved fraction of the matmul rate;
3. whole-volume inference time and peak resident memory for a 32x384x384 volume and a real-size
   64x624x924 FOV (tiled by :func:`vstain.inference.infer.predict_volume` when over its memory budget).

Usage::

    python benchmarks/bench_unet.py                 # the full benchmark (minutes; run on a quiet machine)
    python benchmarks/bench_unet.py --quick         # a tiny setting that checks the script runs
    python benchmarks/bench_unet.py --channels-last --threads 2 --json out.json

CPU speed options measured by flags: ``--channels-last`` (channels_last_3d activations for
oneDNN), ``--compile`` (torch.compile fuses instance norm + LeakyReLU), ``--threads``,
``--batch``/``--crop`` (bigger work per step), ``--no-mkldnn`` (to compare).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import numpy as np
import torch
from peaks import Peak, rss
from torch.utils.flop_counter import FlopCounterMode

from vstain.inference.infer import default_max_voxels, plan, predict_volume
from vstain.losses import masked_l1
from vstain.models import Generator, GeneratorConfig, num_params
from vstain.training.trainer import make_optimizer

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs (seconds)")
p.add_argument("--widths", type=int, nargs="+", default=[64, 16], help="generator widths (thesis 64, book 16)")
p.add_argument("--crop", type=int, nargs=3, default=[16, 64, 64], help="training crop Z Y X (book profile)")
p.add_argument("--batch", type=int, default=4, help="training batch size (book profile)")
p.add_argument("--steps", type=int, default=5, help="timed training steps per width")
p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
p.add_argument("--matmul-n", type=int, default=4096, help="matrix size of the matmul peak measurement")
p.add_argument("--infer-width", type=int, default=64, help="generator width for the inference measurements")
p.add_argument("--infer-sizes", type=str, nargs="+", default=["32x384x384", "64x624x924"], help="volumes ZxYxX")
p.add_argument("--budget-gb", type=float, default=4.0, help="activation budget of whole-volume inference, GiB")
p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
p.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format")
p.add_argument("--compile", action="store_true", help="torch.compile the generator")
p.add_argument("--no-mkldnn", action="store_true", help="disable oneDNN (for comparison)")
p.add_argument("--json", type=str, default="", help="also write the results to this JSON file")
args = p.parse_args()
if args.quick:
    args.widths, args.crop, args.batch, args.steps, args.warmup = [8, 4], [8, 16, 16], 2, 2, 1
    args.matmul_n, args.infer_width, args.infer_sizes = 512, 4, ["16x48x40", "16x96x80"]
    args.budget_gb = 16 * 48 * 48 * 4 * 8 * 4 / 2**30  # the second volume is tiled
if args.threads:
    torch.set_num_threads(args.threads)
if args.no_mkldnn:
    torch.backends.mkldnn.enabled = False
torch.manual_seed(0)
fmt = torch.channels_last_3d if args.channels_last else torch.contiguous_format
results: dict = {
    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__,
    "threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available() and not args.no_mkldnn,
    "channels_last": args.channels_last, "compile": args.compile, "quick": args.quick,
}


# --- 1. dense matmul rate ------------------------------------------------------------------------
n = args.matmul_n
a, b = torch.randn(n, n), torch.randn(n, n)
torch.mm(a, b)
best = float("inf")
for _ in range(5):
    t = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - t)
matmul_flops = 2 * n**3 / best
results["matmul_gflops"] = round(matmul_flops / 1e9, 1)
print(f"dense fp32 matmul ({n}x{n}), {results['threads']} threads: {matmul_flops / 1e9:.1f} GFLOP/s")
del a, b

# --- 2. training step ------------------------------------------------------------------------------
results["train"] = []
for width in args.widths:
    gen = Generator(GeneratorConfig(base_width=width)).to(memory_format=fmt)
    if args.compile:
        gen.compile()  # in place
    opt = make_optimizer(gen.parameters(), "adam", lr=2e-4, betas=(0.5, 0.9))  # as vstain.training.unet uses it
    x = torch.randn(args.batch, 1, *args.crop).contiguous(memory_format=fmt)
    y = torch.randn(args.batch, 6, *args.crop)
    y[:, 2:5] = float("nan")  # three unlabelled channels, as in a real FOV

    def step():
        opt.zero_grad(set_to_none=True)
        loss = masked_l1(gen(x), y)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    dt = float(np.median(times))
    vox = args.batch * int(np.prod(args.crop))
    row = {"width": width, "params": num_params(gen), "batch": args.batch, "crop": list(args.crop),
           "step_s": round(dt, 4), "voxels_per_s": round(vox / dt), "gflop_per_step": round(flops / 1e9, 2),
           "gflops": round(flops / dt / 1e9, 1), "fraction_of_matmul": round(flops / dt / matmul_flops, 3)}
    results["train"].append(row)
    print(f"train width {width:3d} ({row['params'] / 1e6:.2f} M params), batch {args.batch} x "
          f"{'x'.join(map(str, args.crop))}: {dt:.3f} s/step, {vox / dt / 1e6:.3f} Mvoxel/s, "
          f"{flops / 1e9:.1f} GFLOP/step -> {flops / dt / 1e9:.1f} GFLOP/s = "
          f"{100 * flops / dt / matmul_flops:.0f}% of matmul")
    del gen, opt, x, y

# --- 3. whole-volume inference ---------------------------------------------------------------------
results["infer"] = []
gen = Generator(GeneratorConfig(base_width=args.infer_width)).eval()
max_voxels = default_max_voxels(gen, int(args.budget_gb * 2**30))
for size in args.infer_sizes:
    zyx = tuple(int(s) for s in size.lower().split("x"))
    vol = np.random.default_rng(0).normal(size=(1, *zyx)).astype(np.float32)
    mode = plan(zyx, max_voxels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiling notice; the mode is reported below
        with Peak(rss) as mem:
            t = time.perf_counter()
            out = predict_volume(gen, vol, max_voxels=max_voxels)
            dt = time.perf_counter() - t
    assert out.shape == (6, *zyx)
    row = {"width": args.infer_width, "volume": list(zyx), "mode": mode, "seconds": round(dt, 2),
           "peak_rss_gib": round(mem.peak / 2**30, 2), "rss_increase_gib": round((mem.peak - mem.base) / 2**30, 2),
           "bytes_per_input_voxel": round((mem.peak - mem.base) / np.prod(zyx)), "max_voxels": max_voxels}
    results["infer"].append(row)
    print(f"inference width {args.infer_width}, {size}: {mode}, {dt:.1f} s, peak RSS {row['peak_rss_gib']} GiB "
          f"(+{row['rss_increase_gib']} GiB, {row['bytes_per_input_voxel']} B per input voxel; "
          f"budget {args.budget_gb * 1024:.0f} MiB = {max_voxels} voxels)")
    del vol, out

if args.json:
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print("wrote", args.json)
