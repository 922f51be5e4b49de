"""Wall time of one WGAN-GP generator iteration against one U-Net step at the same size.

One generator iteration = ``n_critic`` critic steps (each on a fresh batch) + 1 generator step,
exactly as :meth:`vstain.training.wgan.WGAN.training_step` runs them: the critic steps run the generator
without a graph, except the last, whose forward (with its graph) the generator step reuses.
One U-Net step = forward, masked L1, backward, optimiser step.

The floor: a U-Net step costs about 3 generator forwards (forward + a backward of twice its cost),
and an iteration needs at least ``n_critic`` generator forwards for the critic steps plus one full
generator step, i.e. ``1 + n_critic / 3`` U-Net steps when the critic were free (the issue's
target: within 1.15x of it). With the last forward shared the generator part alone is
``(n_critic + 2) / 3`` U-Net steps, which leaves the critic (its penalty needs a double backward)
a margin. The script also counts FLOPs (``torch.utils.flop_counter``'s formulas) so the time
ratio can be read against the FLOP ratio.

Usage::

    python benchmarks/bench_wgan.py                  # book-profile size: width 16, 16x64x64, batch 4
    python benchmarks/bench_wgan.py --quick          # a few seconds: a smoke test, not a measurement
    python benchmarks/bench_wgan.py --width 64 --crop 32 128 128 --batch 2 --device cuda
    python benchmarks/bench_wgan.py --trace /tmp/wgan_trace.json   # a profiler trace of one iteration

Not collected by pytest; no test asserts a time.
"""
import argparse
import json
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from vstain.channels import TARGETS
from vstain.losses import masked_l1
from vstain.training.configs import WGANConfig
from vstain.training.trainer import make_optimizer
from vstain.training.wgan import WGAN

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--width", type=int, default=16, help="generator and critic base width (thesis 64)")
p.add_argument("--crop", type=int, nargs=3, default=(16, 64, 64), help="crop Z Y X")
p.add_argument("--batch", type=int, default=4)
p.add_argument("--n-critic", type=int, default=5)
p.add_argument("--optimizer", default="rmsprop", choices=("rmsprop", "adam"))
p.add_argument("--iters", type=int, default=3, help="timed generator iterations (and up to 3x as many U-Net steps); the best is reported")
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="autocast dtype on GPU")
p.add_argument("--channels-last", action="store_true", help="generator (and the U-Net) in channels_last_3d")
p.add_argument("--critic-channels-last", action="store_true", help="critic in channels_last_3d")
p.add_argument("--quick", action="store_true", help="tiny sizes, one timed iteration")
p.add_argument("--trace", default="", help="write a chrome trace of one iteration here")
p.add_argument("--json", default="", help="also write the results as JSON here")
args = p.parse_args()
if args.quick:
    args.width, args.crop, args.batch, args.iters, args.warmup = 4, (16, 32, 32), 2, 1, 1
if args.threads:
    torch.set_num_threads(args.threads)
dev = torch.device(args.device)
torch.manual_seed(0)

cfg = WGANConfig(base_width=args.width, critic_width=args.width, n_critic=args.n_critic, optimizer=args.optimizer,
                 batch_size=args.batch, crop=tuple(args.crop), channels_last=args.channels_last,
                 critic_channels_last=args.critic_channels_last)
gan = WGAN(cfg).to(dev)
unet_gen = WGAN(cfg).generator.to(dev)  # the same network trained alone, as the U-Net baseline
unet_layout = torch.channels_last_3d if args.channels_last else torch.contiguous_format
unet_opt = make_optimizer(unet_gen.parameters(), args.optimizer, 5e-5)
autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")


def batch():
    """A fresh random batch: x [N,1,Z,Y,X], y [N,6,Z,Y,X] with three labelled channels per sample."""
    x = torch.randn(args.batch, 1, *args.crop, device=dev)
    y = torch.randn(args.batch, len(TARGETS), *args.crop, device=dev)
    y[:, 3:] = float("nan")
    return x, y


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def unet_step(x, y):
    with autocast:
        loss = masked_l1(unet_gen(x.contiguous(memory_format=unet_layout)), y)
    unet_opt.zero_grad(set_to_none=True)
    loss.backward()
    unet_opt.step()


def wgan_iteration(batches, step=0):
    """n_critic critic steps and one generator step, the schedule of WGAN.training_step."""
    with autocast:
        for t, (x, y) in enumerate(batches[:-1]):
            gan.critic_step(x, y, step + t)
        x, y = batches[-1]
        pred = gan.generator(gan._g(x))
        gan.critic_step(x, y, step + cfg.n_critic - 1, pred=pred.detach())
        gan.generator_step(x, y, step + cfg.n_critic, pred=pred)


def timed(fn, n):
    times = []
    for _ in range(n):
        data = [batch() for _ in range(cfg.n_critic)]
        sync()
        t = time.perf_counter()
        fn(data)
        sync()
        times.append(time.perf_counter() - t)
    return min(times), sum(times) / len(times)


class FlopCount(TorchDispatchMode):
    """FLOPs of every op with a formula in torch.utils.flop_counter (works under autograd.grad,
    where FlopCounterMode's module hooks refuse double backward)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def flops(fn, data):
    with FlopCount() as fc:
        fn(data)
    return fc.flops


# FLOPs (on the first batches; the counts do not depend on the values)
data = [batch() for _ in range(cfg.n_critic)]
f_unet = flops(lambda d: unet_step(*d[0]), data)
f_gfwd = flops(lambda d: gan.generator(d[0][0]).detach(), data)
f_iter = flops(wgan_iteration, data)

# warm-up, then timing
for _ in range(args.warmup):
    unet_step(*batch())
    wgan_iteration([batch() for _ in range(cfg.n_critic)])
n_unet = min(3, cfg.n_critic)  # U-Net steps per timed call (each on its own batch)
unet_best, unet_mean = timed(lambda d: [unet_step(*b) for b in d[:n_unet]], args.iters)
unet_best, unet_mean = unet_best / n_unet, unet_mean / n_unet
it_best, it_mean = timed(wgan_iteration, args.iters)

floor = 1 + cfg.n_critic / 3
res = {
    "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
    "width": args.width, "crop": list(args.crop), "channels_last": args.channels_last,
    "critic_channels_last": args.critic_channels_last, "batch": args.batch, "n_critic": cfg.n_critic, "dtype": args.dtype,
    "unet_step_s": round(unet_best, 4), "iteration_s": round(it_best, 4),
    "unet_step_mean_s": round(unet_mean, 4), "iteration_mean_s": round(it_mean, 4),
    "ratio": round(it_best / unet_best, 3), "floor": round(floor, 3),
    "ratio_over_floor": round(it_best / unet_best / floor, 3), "target": 1.15,
    "gflops_unet_step": round(f_unet / 1e9, 2), "gflops_generator_forward": round(f_gfwd / 1e9, 2),
    "gflops_iteration": round(f_iter / 1e9, 2), "flop_ratio": round(f_iter / f_unet, 3),
    "flop_ratio_over_floor": round(f_iter / f_unet / floor, 3),
}
print(f"device: {res['device']}; width {args.width}, crop {tuple(args.crop)}, batch {args.batch}, n_critic {cfg.n_critic}, "
      f"channels_last generator {args.channels_last}, critic {args.critic_channels_last}")
print(f"U-Net step           {unet_best:8.3f} s (mean {unet_mean:.3f}), {f_unet / 1e9:8.2f} GFLOP")
print(f"WGAN iteration       {it_best:8.3f} s (mean {it_mean:.3f}), {f_iter / 1e9:8.2f} GFLOP")
print(f"ratio {res['ratio']:.2f} U-Net steps (FLOPs {res['flop_ratio']:.2f}); floor 1 + n_critic/3 = {floor:.2f}; "
      f"ratio / floor = {res['ratio_over_floor']:.2f} (FLOPs {res['flop_ratio_over_floor']:.2f}); target <= 1.15")
if args.quick:
    print("(--quick: tiny sizes, a smoke test; the times mean nothing)")
if args.json:
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)

if args.trace:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        wgan_iteration([batch() for _ in range(cfg.n_critic)])
        sync()
    prof.export_chrome_trace(args.trace)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
