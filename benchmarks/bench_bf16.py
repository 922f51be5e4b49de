"""bf16 autocast on the CPU: how much faster the book's training step runs, and whether it stays
repeatable. A flat script, not a test.

CPUs with ``avx512_bf16`` run oneDNN's bfloat16 convolutions. For the generator (masked-L1 step,
Adam) and the critic (a forward and backward of its score), at the book profile's width and crop,
this measures

1. seconds per step in fp32, in bf16 autocast with every level in bf16, and in bf16 autocast as the
   models run it: the levels whose maps are Z/8 deep (the generator's bottleneck, the critic's last
   three blocks) in fp32 (:func:`vstain.models.deep_level`);
2. repeatability: two short trainings from one seed, compared weight by weight (bit-identical or
   not), and, after one step, which parameters' gradients differ between two runs.

A result of the book must be repeatable for a seed on one machine, so a precision that is not
cannot be the book's, however fast.

Usage::

    python benchmarks/bench_bf16.py                       # book width 16, crop 16x64x64, batch 4
    python benchmarks/bench_bf16.py --crop 32 64 64 --batch 2 --threads 1
    python benchmarks/bench_bf16.py --quick               # a tiny setting that checks the script runs
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
import torch

from vstain import models
from vstain.losses import masked_l1
from vstain.models import Critic, CriticConfig, Generator, GeneratorConfig

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs (seconds)")
p.add_argument("--width", type=int, default=16, help="generator and critic width (book profile)")
p.add_argument("--crop", type=int, nargs=3, default=[16, 64, 64], help="training crop Z Y X (book profile)")
p.add_argument("--batch", type=int, default=4, help="batch size (book profile)")
p.add_argument("--steps", type=int, default=5, help="timed steps per setting")
p.add_argument("--repeat-steps", type=int, default=4, help="training steps of each repeatability run")
p.add_argument("--threads", type=int, default=2, help="torch threads")
p.add_argument("--json", type=str, default="", help="also write the results to this JSON file")
args = p.parse_args()
if args.quick:
    args.width, args.crop, args.batch, args.steps, args.repeat_steps = 4, [16, 32, 32], 2, 2, 2
torch.set_num_threads(args.threads)
DEEP_LEVEL = models.deep_level


def networks(all_bf16: bool) -> tuple[Generator, Critic]:
    """The generator and critic from one seed; ``all_bf16``: every level in bf16, as plain autocast
    runs them (the models keep their Z/8 levels in fp32 under CPU autocast, vstain.models.deep_level)."""
    models.deep_level = (lambda module, x: module(x)) if all_bf16 else DEEP_LEVEL
    torch.manual_seed(0)
    return Generator(GeneratorConfig(base_width=args.width)), Critic(CriticConfig(base_width=args.width))


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(args.batch, 1, *args.crop, generator=g)
        y = torch.randn(args.batch, 6, *args.crop, generator=g)
        y[:, 2:5] = float("nan")  # three unlabelled channels, as in a real FOV
        yield x, y


def step(gen, critic, opt_g, opt_c, x, y, bf16: bool) -> None:
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    opt_g.zero_grad(set_to_none=True)
    with amp:
        pred = gen(x)
    masked_l1(pred.float(), y).backward()
    opt_g.step()
    opt_c.zero_grad(set_to_none=True)
    with amp:
        score = critic(x, torch.nan_to_num(y)).float().mean() - critic(x, pred.detach()).float().mean()
    score.backward()
    opt_c.step()


def train(bf16: bool, all_bf16: bool, n: int, timed: bool = False):
    gen, critic = networks(all_bf16)
    opt_g, opt_c = torch.optim.Adam(gen.parameters(), 1e-3), torch.optim.Adam(critic.parameters(), 1e-3)
    times = []
    for x, y in batches(n):
        t = time.perf_counter()
        step(gen, critic, opt_g, opt_c, x, y, bf16)
        times.append(time.perf_counter() - t)
    weights = torch.cat([q.detach().flatten() for q in [*gen.parameters(), *critic.parameters()]])
    return weights, float(np.median(times[2:] if timed else times))


def grads_that_differ(all_bf16: bool) -> list[str]:
    runs = []
    for _ in range(2):
        gen, critic = networks(all_bf16)
        x, y = next(batches(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = gen(x)
            score = critic(x, pred).float().mean()
        (masked_l1(pred.float(), y) + score).backward()
        runs.append({f"{k}.{n}": q.grad.clone() for k, net in (("generator", gen), ("critic", critic))
                     for n, q in net.named_parameters()})
    return [n for n in runs[0] if not torch.equal(runs[0][n], runs[1][n])]


results = {"width": args.width, "crop": args.crop, "batch": args.batch, "threads": args.threads, "settings": []}
print(f"width {args.width}, batch {args.batch} x {'x'.join(map(str, args.crop))}, {args.threads} threads")
for name, bf16, every in [("fp32", False, False), ("bf16, every level", True, True),
                          ("bf16, Z/8 levels in fp32", True, False)]:
    _, seconds = train(bf16, every, args.steps + 2, timed=True)
    a, _ = train(bf16, every, args.repeat_steps)
    b, _ = train(bf16, every, args.repeat_steps)
    same = torch.equal(a, b)
    row = {"setting": name, "step_s": round(seconds, 3), "repeatable": same,
           "max_weight_difference": float((a - b).abs().max()),
           "gradients_differ": grads_that_differ(every) if bf16 else []}
    results["settings"].append(row)
    print(f"{name:24s} {seconds:.3f} s per generator + critic step; two runs from one seed "
          f"{'bit-identical' if same else 'differ (max weight difference %.3g)' % row['max_weight_difference']}"
          + (f"; gradients that differ after one step: {row['gradients_differ']}" if row["gradients_differ"] else ""))
if args.json:
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print("wrote", args.json)
