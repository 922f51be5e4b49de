"""Benchmark of Noise2Void (careamics) training and tiled prediction in both memory layouts of its
3D U-Net: PyTorch's default (channels first) and ``channels_last_3d``. A flat script, not a test.

Trains one channel's model at the quick profile's settings (``notebooks/03_denoising``'s defaults)
on synthetic noisy stacks, once per layout, in one process, then denoises every stack. Prints the
training and prediction seconds of each layout, their ratio, and the largest difference between the
two layouts' denoised stacks (numerically equivalent, not bit-identical). Compare ratios measured in
one run; absolute times differ between machines of one kind.

Usage::

    python benchmarks/bench_n2v.py              # 12 stacks of 16x96x96, the quick profile's settings
    python benchmarks/bench_n2v.py --stacks 3   # fewer stacks (a channel that 3 FOVs carry)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from vstain.preprocess import denoise

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--stacks", type=int, default=12, help="noisy stacks the model trains on")
p.add_argument("--shape", type=int, nargs=3, default=[16, 96, 96], help="stack shape Z Y X")
p.add_argument("--epochs", type=int, default=3, help="03_denoising quick default")
p.add_argument("--steps", type=int, default=8, help="batches per epoch, 03_denoising quick default")
args = p.parse_args()

rng = np.random.default_rng(0)
clean = [rng.gamma(2.0, 50.0, size=args.shape).astype(np.float32) for _ in range(args.stacks)]
stacks = [c + rng.normal(0, 20.0, size=c.shape).astype(np.float32) for c in clean]
base = denoise.N2VConfig(patch_size=(8, 32, 32), batch_size=8, epochs=args.epochs, steps_per_epoch=args.steps,
                         depth=2, base_width=8, batch_norm=False, masked_pixel_percentage=5.0, roi_size=11,
                         n_val_patches=4, learning_rate=3e-3, tile_size=(16, 64, 64), tile_overlap=(4, 16, 16))
out, times = {}, {}
with tempfile.TemporaryDirectory() as tmp:
    for last in (False, True):
        name = "channels_last_3d" if last else "default"
        t0 = time.perf_counter()
        model = denoise.train_n2v(stacks, "bench", Path(tmp) / name, replace(base, channels_last=last))
        t1 = time.perf_counter()
        out[name] = [model.denoise(s) for s in stacks]
        times[name] = (t1 - t0, time.perf_counter() - t1)
        print(f"{name:>16}: train {times[name][0]:6.1f} s ({args.epochs * args.steps} steps), "
              f"denoise {times[name][1]:5.1f} s ({args.stacks} stacks of {tuple(args.shape)})")
(tr0, pr0), (tr1, pr1) = times["default"], times["channels_last_3d"]
print(f"channels_last_3d / default: train {tr1 / tr0:.2f}, denoise {pr1 / pr0:.2f}")
scale = max(float(np.abs(s).max()) for s in out["default"])
diff = max(float(np.abs(a - b).max()) for a, b in zip(out["default"], out["channels_last_3d"]))
print(f"largest difference between the layouts' denoised stacks: {diff:.3g} ({diff / scale:.2%} of the largest value)")
