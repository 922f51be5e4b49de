"""Whole-volume prediction of one FOV on the CPU: the models' Conv3d (oneDNN for a batch of one)
against PyTorch's own choice (its native im2col kernel whenever N*C*Z*Y <= 20480).

Every prediction in the book is a batch of one volume (a test FOV, a tile, an ODE step of the
flow), so this heuristic decides how fast 04-10 predict on a CPU. A flat script, not a test.

Usage::

    python benchmarks/bench_conv_batch1.py                  # quick, book and a deeper size, 2 threads
    python benchmarks/bench_conv_batch1.py --threads 1 --repeats 5
"""
from __future__ import annotations

import argparse
import time

import torch

from vstain.models import Conv3d, Generator, GeneratorConfig

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
p.add_argument("--repeats", type=int, default=3, help="timed forwards per setting (best is kept)")
p.add_argument("--sizes", nargs="+", default=["8:16x96x96", "16:32x128x128", "16:32x64x64", "64:32x128x128"],
               help="width:ZxYxX settings (the quick and book profiles' U-Net on their test FOVs, and more)")
args = p.parse_args()
torch.set_num_threads(args.threads)


def best_of(fn) -> float:
    fn()  # warm-up: oneDNN builds its kernels on the first call
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


ours = Conv3d._conv_forward
print(f"{'width':>5} {'volume':>12} {'PyTorch s':>10} {'oneDNN s':>9} {'speed-up':>8}  (threads {args.threads})")
for setting in args.sizes:
    width, zyx = setting.split(":")
    gen = Generator(GeneratorConfig(base_width=int(width))).eval()
    x = torch.randn(1, 1, *(int(v) for v in zyx.split("x")))
    with torch.no_grad():
        new = best_of(lambda: gen(x))
        Conv3d._conv_forward = torch.nn.Conv3d._conv_forward  # PyTorch's own kernel choice
        try:
            old = best_of(lambda: gen(x))
        finally:
            Conv3d._conv_forward = ours
    print(f"{width:>5} {zyx:>12} {old:10.3f} {new:9.3f} {old / new:7.1f}x")
