"""The perceptual classification metric's network (thesis 4.1): a 3D ResNet (MONAI
``resnet10``/``resnet18``, one input channel, six classes) that learns from 3D patches of *real*
target channels which structure a patch shows, its configuration, training and held-out report.

Scored on patches of a model's generated channels (:mod:`vstain.evaluate.perceptual`), its
per-class F1 says how recognisable (realistic) the generated structure is: the F1clf column of
Table 4.1. Where the patches sit is :mod:`vstain.evaluate.patches`.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vstain.channels import TARGETS

from .patches import REAL, fov_scoring_patches, no_patch_error, normalise, scoring_patches, training_pool

ARCHS = ("resnet10", "resnet18")  # MONAI 3D ResNets (monai.networks.nets), imported when a network is built
FEATURE_LAYERS = ("stem", "layer1", "layer2", "layer3", "layer4")


@dataclass
class ClassifierConfig:
    """The classifier, its patches and its training.

    Args:
        arch: ``"resnet10"`` or ``"resnet18"`` (MONAI, ``spatial_dims=3``, no pretrained weights).
        widen_factor: block widths are 64/128/256/512 times this (MONAI's default is 1.0).
        conv1_size: kernel of the first convolution (MONAI's default 7; 3 is cheaper on a CPU).
        conv1_stride: stride of the first convolution ``(Z, Y, X)`` (MONAI's default 1); (1, 2, 2)
            quarters the cost of everything after it.
        patch: patch size ``(Z, Y, X)``; must fit every FOV.
        train_stride: grid step of candidate training patches (``None``: half the patch).
        eval_stride: grid step of scored patches (``None``: the patch, i.e. non-overlapping).
        min_foreground_ratio: background rule (module docstring): least foreground fraction of a
            kept patch, relative to its FOV channel's; >= 0 (0 keeps every patch with foreground).
        patch_norm: standardise each patch before the network.
        pool_per_class: most training patches kept in memory per class.
        epochs: training epochs.
        patches_per_class: patches drawn per class and epoch (class-balanced sampling).
        batch_size: patches per step.
        lr: AdamW learning rate at the start; it decays to 0 along a cosine over the run.
        weight_decay: AdamW weight decay.
        seed: seeds the pool, the sampling, the augmentation and the weights.
    """

    arch: str = "resnet10"  # thesis: "a ResNet"
    widen_factor: float = 0.25  # 16/32/64/128 channels
    conv1_size: int = 3
    conv1_stride: tuple[int, int, int] = (1, 2, 2)  # a 5x cheaper network on 16x32x32 patches
    patch: tuple[int, int, int] = (16, 32, 32)
    train_stride: tuple[int, int, int] | None = None
    eval_stride: tuple[int, int, int] | None = None
    min_foreground_ratio: float = 0.5
    patch_norm: bool = True
    pool_per_class: int = 512
    epochs: int = 8
    patches_per_class: int = 48
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    classes: tuple[str, ...] = field(default=TARGETS)

    def __post_init__(self):
        self.patch = tuple(int(p) for p in self.patch)
        self.conv1_stride = tuple(int(s) for s in self.conv1_stride)
        if self.train_stride is not None:
            self.train_stride = tuple(int(s) for s in self.train_stride)
        if self.eval_stride is not None:
            self.eval_stride = tuple(int(s) for s in self.eval_stride)
        self.classes = tuple(self.classes)
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        if len(self.patch) != 3 or min(self.patch) < 4:
            raise ValueError(f"patch must be 3 sizes (Z, Y, X) of at least 4, got {self.patch}")
        if not 0 <= self.min_foreground_ratio <= 20:
            raise ValueError(f"min_foreground_ratio must be in [0, 20], got {self.min_foreground_ratio}")
        if not 0 < self.widen_factor <= 4:
            raise ValueError(f"widen_factor must be in (0, 4], got {self.widen_factor}")
        for k in ("epochs", "patches_per_class", "batch_size", "pool_per_class"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1, got {getattr(self, k)}")

    @property
    def train_step(self) -> tuple[int, ...]:
        return self.train_stride or tuple(max(1, p // 2) for p in self.patch)

    @property
    def eval_step(self) -> tuple[int, ...]:
        return self.eval_stride or self.patch


def build_classifier(cfg: ClassifierConfig) -> torch.nn.Module:
    """A MONAI 3D ResNet, ``forward(x [N,1,Z,Y,X]) -> logits [N,6]``, randomly initialised."""
    from monai.networks import nets  # MONAI loads all its subpackages on import (seconds): only when a network is built

    torch.manual_seed(cfg.seed)
    return getattr(nets, cfg.arch)(pretrained=False, spatial_dims=3, n_input_channels=1, num_classes=len(cfg.classes),
                                   widen_factor=cfg.widen_factor, conv1_t_size=cfg.conv1_size,
                                   conv1_t_stride=cfg.conv1_stride)


def num_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters of a network."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def features(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Activations of the ResNet's stem and four stages, MONAI ``ResNet.forward`` written out:
    ``[N,C_l,z_l,y_l,x_l]`` for l in :data:`FEATURE_LAYERS`."""
    s = model.act(model.bn1(model.conv1(x)))
    if not model.no_max_pool:
        s = model.maxpool(s)
    l1 = model.layer1(s)
    l2 = model.layer2(l1)
    l3 = model.layer3(l2)
    l4 = model.layer4(l3)
    return [s, l1, l2, l3, l4]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips along Z, Y and X and, for square patches, a random 90° turn in YX (``[N,1,Z,Y,X]``)."""
    for ax in (2, 3, 4):
        if torch.rand(1, generator=gen).item() < 0.5:
            x = x.flip(ax)
    if x.shape[3] == x.shape[4]:
        x = torch.rot90(x, int(torch.randint(4, (1,), generator=gen)), dims=(3, 4))
    return x


# ---------------------------------------------------------------------------------------------
# Training and prediction
# ---------------------------------------------------------------------------------------------
def autocast(device: str, precision: str):
    if precision in ("32-true", "32"):
        return torch.autocast(device_type=torch.device(device).type, enabled=False)
    if precision == "bf16-mixed":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be '32-true' or 'bf16-mixed', got {precision!r}")


@torch.no_grad()
def apply_batches(model, patches: np.ndarray, cfg: ClassifierConfig, fn, device: str = "cpu",
                  precision: str = "32-true", batch_size: int = 64) -> np.ndarray:
    """``fn(model, x)`` of the normalised patches ``[N,pz,py,px]``, batch by batch, as one float32 array."""
    model.eval().to(device)
    out = []
    for i in range(0, len(patches), batch_size):
        x = normalise(torch.from_numpy(patches[i:i + batch_size])[:, None].to(device), cfg.patch_norm)
        with autocast(device, precision):
            out.append(fn(model, x).float().cpu())
    return torch.cat(out).numpy()


def predict(model, patches: np.ndarray, cfg: ClassifierConfig, device: str = "cpu", precision: str = "32-true",
            batch_size: int = 64) -> np.ndarray:
    """Class probabilities ``[N,6]`` of patches ``[N,pz,py,px]``."""
    return apply_batches(model, patches, cfg, lambda m, x: torch.softmax(m(x).float(), 1), device, precision,
                         batch_size)


def train_classifier(stage_in, cfg: ClassifierConfig, device: str = "cpu", precision: str = "32-true",
                     progress: bool = True):
    """Train on measured patches of the train split (AdamW, cosine learning-rate decay), checking on
    measured patches of the val split each epoch.

    Returns ``(model, history)``: ``history`` has one row per epoch with ``epoch, train_loss,
    train_acc, val_loss, val_acc, seconds``."""
    t0 = time.time()
    xs, ys = training_pool(stage_in, cfg, "train")
    vmeta, vp = scoring_patches(stage_in, "val", cfg)
    xv, yv = vp[REAL], vmeta["class"].to_numpy(copy=True)
    model = build_classifier(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(cfg.classes) * cfg.patches_per_class // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng((cfg.seed, 2))
    by_class = [np.flatnonzero(ys == c) for c in range(len(cfg.classes))]
    rows = []
    bar = tqdm(range(cfg.epochs), desc="classifier", disable=not progress)
    for epoch in bar:
        idx = rng.permutation(np.concatenate([rng.choice(b, cfg.patches_per_class) for b in by_class]))
        model.train()
        tot, correct, n = 0.0, 0, 0
        for i in range(0, len(idx), cfg.batch_size):
            b = idx[i:i + cfg.batch_size]
            if len(b) < 2:  # BatchNorm needs two samples
                continue
            x = augment(torch.from_numpy(xs[b])[:, None], gen).to(device)
            y = torch.from_numpy(ys[b]).long().to(device)
            with autocast(device, precision):
                logits = model(normalise(x, cfg.patch_norm)).float()
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(b)
            correct += int((logits.argmax(1) == y).sum())
            n += len(b)
        pv = predict(model, xv, cfg, device, precision)
        val_loss = float(F.nll_loss(torch.log(torch.from_numpy(pv).clamp_min(1e-8)), torch.from_numpy(yv).long()))
        rows.append({"epoch": epoch, "train_loss": tot / n, "train_acc": correct / n, "val_loss": val_loss,
                     "val_acc": float((pv.argmax(1) == yv).mean()), "seconds": round(time.time() - t0, 2)})
        bar.set_postfix(loss=f"{tot / n:.3f}", val_acc=f"{rows[-1]['val_acc']:.3f}")
    return model, pd.DataFrame(rows)


def confusion(y_true, y_pred, n: int = len(TARGETS)) -> np.ndarray:
    """Counts ``[n,n]``: row = true class, column = predicted class."""
    m = np.zeros((n, n), np.int64)
    np.add.at(m, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return m


def f1_scores(conf: np.ndarray) -> np.ndarray:
    """Per-class F1 from a confusion matrix; NaN for a class with no true and no predicted patch."""
    tp = np.diag(conf).astype(float)
    den = conf.sum(0) + conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / den, np.nan)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def heldout_report(model, stage_in, cfg: ClassifierConfig, device: str = "cpu", precision: str = "32-true") -> dict:
    """Accuracy, per-class F1 and the confusion matrix on measured patches of the val and test splits."""
    rep = {}
    for split in ("val", "test"):
        ys, yhats = [], []
        for meta, p in fov_scoring_patches(stage_in, split, cfg):
            ys.append(meta["class"].to_numpy(copy=True))
            yhats.append(predict(model, p[REAL], cfg, device, precision).argmax(1))
        if not ys:
            raise no_patch_error(split, cfg)
        y, yhat = np.concatenate(ys), np.concatenate(yhats)
        conf = confusion(y, yhat, len(cfg.classes))
        rep[split] = {"accuracy": float((y == yhat).mean()), "n_patches": int(len(y)),
                      "patches_per_class": dict(zip(cfg.classes, np.bincount(y, minlength=len(cfg.classes)).tolist())),
                      "f1": dict(zip(cfg.classes, [None if np.isnan(v) else float(v) for v in f1_scores(conf)])),
                      "confusion": conf.tolist()}
    rep["chance"] = 1 / len(cfg.classes)
    return rep


def run_classifier_stage(stage_in, out_dir, cfg: ClassifierConfig, device: str = "cpu", precision: str = "32-true",
                         progress: bool = True) -> dict:
    """Train the classifier on real train patches and write ``classifier.pt`` (state dict),
    ``classifier.json`` (config and classes), ``history.csv`` and ``heldout.json`` into ``out_dir``.
    Returns the held-out report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, hist = train_classifier(stage_in, cfg, device, precision, progress)
    torch.save(model.state_dict(), out / "classifier.pt")
    (out / "classifier.json").write_text(json.dumps(asdict(cfg), indent=2))
    hist.to_csv(out / "history.csv", index=False)
    rep = heldout_report(model, stage_in, cfg, device, precision)
    (out / "heldout.json").write_text(json.dumps(rep, indent=2))
    return rep


def load_classifier(stage_dir, device: str = "cpu") -> tuple[torch.nn.Module, ClassifierConfig]:
    """The trained classifier of a ``06_classifier`` stage folder, in eval mode."""
    d = Path(stage_dir)
    cfg = ClassifierConfig(**json.loads((d / "classifier.json").read_text()))
    model = build_classifier(cfg)
    model.load_state_dict(torch.load(d / "classifier.pt", map_location=device, weights_only=True))
    return model.eval().to(device), cfg
