"""The perceptual classification metric (thesis 4.1) and a deep perceptual distance (thesis 4.3).

A 3D ResNet (MONAI ``resnet10``/``resnet18``, one input channel, six classes) learns from 3D patches
of *real* target channels which structure a patch shows. Scored on patches of a model's generated
channels, its per-class F1 says how recognisable (realistic) the generated structure is: the F1clf
column of Table 4.1. The same network's activations give an LPIPS-style distance between a real
patch and the generated patch at the same place (Zhang et al. 2018, with uniform layer weights).

Patches. Every patch is a ``patch``-sized box on a regular grid of one channel of one FOV.
**Background rule**: a channel's foreground is the set of voxels above the Otsu threshold of that
channel's whole FOV volume (of the *reference*: the real target, or the clean truth); a patch is
kept only if it holds foreground and its foreground fraction is at least ``min_foreground_ratio``
times the fraction over the whole FOV channel. Relative to the FOV, the rule suits dense channels
(membrane: a third of the voxels) and sparse ones (nucleoli: under 1 %) alike. It is applied to
the reference, never to a prediction, so every model is scored at the same places.

Which generated channels are scored. ``reference="target"`` (Table 4.1): the labelled channels of
each FOV, the only ones where a measured patch exists to place the patch and to compare against; each
generated patch's true class is the channel it was generated for. ``reference="truth"`` (simulated
data only): all six generated channels of every FOV, placed by the clean truth, the truth patch
serving as the measured patch of the distance.

Each patch is standardised (zero mean, unit standard deviation) before the network when
``patch_norm`` is on, so the classifier judges shape and texture rather than a FOV's brightness.

The patch rule, the network, its training and the two scores are kept in one file because both
scores must use exactly the patches and the network that the training used.
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
from monai.networks.nets import resnet10, resnet18
from skimage.filters import threshold_otsu
from tqdm import tqdm

from ..channels import TARGETS
from ..dataset import load_fov, read_manifest, read_volume

ARCHS = {"resnet10": resnet10, "resnet18": resnet18}
FEATURE_LAYERS = ("stem", "layer1", "layer2", "layer3", "layer4")
REAL = "Measured"  # the model name of the measured targets' own patches in score tables


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
    torch.manual_seed(cfg.seed)
    return ARCHS[cfg.arch](pretrained=False, spatial_dims=3, n_input_channels=1, num_classes=len(cfg.classes),
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


# ---------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------
def grid_starts(shape, patch, step) -> list[tuple[int, int, int]]:
    """Corners of a regular grid of ``patch`` boxes inside ``shape`` (Z, Y, X)."""
    if any(p > s for p, s in zip(patch, shape)):
        raise ValueError(f"patch {tuple(patch)} does not fit a volume of shape {tuple(shape)} (Z, Y, X)")
    axes = [range(0, s - p + 1, st) for s, p, st in zip(shape, patch, step)]
    return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]


def foreground(ref: np.ndarray) -> np.ndarray:
    """Voxels of ``ref`` ``[Z,Y,X]`` above its Otsu threshold (none for a constant volume)."""
    return ref > threshold_otsu(ref) if np.ptp(ref) > 0 else np.zeros(ref.shape, bool)


def foreground_starts(ref: np.ndarray, patch, step, ratio: float) -> list[tuple[int, int, int]]:
    """Grid corners whose patch of ``ref`` ``[Z,Y,X]`` passes the background rule (module docstring)."""
    fg = foreground(ref)
    least = ratio * fg.mean()
    keep = []
    for z, y, x in grid_starts(ref.shape, patch, step):
        f = fg[z:z + patch[0], y:y + patch[1], x:x + patch[2]].mean()
        if f > 0 and f >= least:
            keep.append((z, y, x))
    return keep


def cut(vol: np.ndarray, starts, patch) -> np.ndarray:
    """Patches ``[N, pz, py, px]`` of a ``[Z,Y,X]`` volume at ``starts``."""
    pz, py, px = patch
    out = np.empty((len(starts), pz, py, px), np.float32)
    for i, (z, y, x) in enumerate(starts):
        out[i] = vol[z:z + pz, y:y + py, x:x + px]
    return out


def normalise(p: torch.Tensor, on: bool = True) -> torch.Tensor:
    """Standardise each patch of ``[N,1,Z,Y,X]`` (when ``on``)."""
    if not on:
        return p
    dims = tuple(range(1, p.ndim))
    return (p - p.mean(dims, keepdim=True)) / (p.std(dims, keepdim=True) + 1e-6)


def _fovs(stage_in, split):
    df = read_manifest(stage_in)
    df = df[df["split"] == split]
    if df.empty:
        raise ValueError(f"the processed set at {stage_in} has no FOV in split '{split}'")
    return df


def _reference(row, target, truth, reference):
    """The reference volume and the channels to score, for one FOV."""
    if reference == "target":
        return target, [c for c in range(target.shape[0]) if np.isfinite(target[c]).all()]
    if reference == "truth":
        if truth is None:
            raise ValueError(f"FOV {row['fov_id']} has no clean truth: reference='truth' needs simulated data")
        return truth, list(range(truth.shape[0]))
    raise ValueError(f"reference must be 'target' or 'truth', got {reference!r}")


def training_pool(stage_in, cfg: ClassifierConfig, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Measured training patches ``[N,pz,py,px]`` and their classes ``[N]``: every labelled channel of
    every FOV of ``split`` gives foreground patches of its class, at most ``pool_per_class`` per
    class, spread evenly over the FOVs that carry it."""
    df = _fovs(stage_in, split)
    rng = np.random.default_rng((cfg.seed, 1))
    # pass 1: the foreground patches of every labelled channel (one FOV in memory at a time)
    starts: dict[tuple[int, int], list] = {}
    for i, (_, row) in enumerate(df.iterrows()):
        _, target, _ = load_fov(row)
        for c in _reference(row, target, None, "target")[1]:
            s = foreground_starts(target[c], cfg.patch, cfg.train_step, cfg.min_foreground_ratio)
            if s:
                starts[i, c] = s
    n_fovs = np.bincount([c for _, c in starts], minlength=len(cfg.classes))
    for c in np.flatnonzero(n_fovs == 0):
        raise ValueError(f"no training patch of class '{cfg.classes[c]}' in split '{split}' passes the "
                         f"background rule (min_foreground_ratio={cfg.min_foreground_ratio}): lower it or add FOVs")
    # pass 2: cut an even share of each class's pool from every FOV that carries it
    xs, ys = [], []
    for i, (_, row) in enumerate(df.iterrows()):
        chans = [c for (j, c) in starts if j == i]
        if not chans:
            continue
        _, target, _ = load_fov(row)
        for c in chans:
            s = starts[i, c]
            pick = rng.permutation(len(s))[:max(1, cfg.pool_per_class // n_fovs[c])]
            xs.append(cut(target[c], [s[k] for k in pick], cfg.patch))
            ys.append(np.full(len(pick), c))
    return np.concatenate(xs), np.concatenate(ys)


def fov_scoring_patches(stage_in, split: str, cfg: ClassifierConfig, pred_dirs: dict[str, str | Path] | None = None,
                        reference: str = "target"):
    """FOV by FOV (one FOV's volumes in memory at a time), the measured (reference) patches of one
    split and, for every model, the generated patches at the same places. Yields ``(meta,
    patches)`` per FOV with a kept patch: ``meta`` a table ``fov_id, channel, class, z, y, x`` and
    ``patches`` a dict ``{REAL: [n,pz,py,px], model: [n,pz,py,px], ...}``."""
    pred_dirs = pred_dirs or {}
    for _, row in _fovs(stage_in, split).iterrows():
        _, target, truth = load_fov(row)
        ref, chans = _reference(row, target, truth, reference)
        preds = {m: read_volume(Path(d) / f"{row['fov_id']}.tif") for m, d in pred_dirs.items()}
        for m, p in preds.items():
            if p.shape != ref.shape:
                raise ValueError(f"{m} prediction of FOV {row['fov_id']} has shape {p.shape}, expected {ref.shape}")
        metas, out = [], {REAL: [], **{m: [] for m in pred_dirs}}
        for c in chans:
            starts = foreground_starts(ref[c], cfg.patch, cfg.eval_step, cfg.min_foreground_ratio)
            if not starts:
                continue
            metas.append(pd.DataFrame({"fov_id": row["fov_id"], "channel": TARGETS[c], "class": c,
                                       "z": [s[0] for s in starts], "y": [s[1] for s in starts],
                                       "x": [s[2] for s in starts]}))
            out[REAL].append(cut(ref[c], starts, cfg.patch))
            for m, p in preds.items():
                out[m].append(cut(p[c], starts, cfg.patch))
        del target, truth, ref, preds
        if metas:
            yield pd.concat(metas, ignore_index=True), {k: np.concatenate(v) for k, v in out.items()}


def _no_patch(split: str, cfg: ClassifierConfig) -> ValueError:
    return ValueError(f"no patch of split '{split}' passes the background rule "
                      f"(min_foreground_ratio={cfg.min_foreground_ratio})")


def scoring_patches(stage_in, split: str, cfg: ClassifierConfig, pred_dirs: dict[str, str | Path] | None = None,
                    reference: str = "target"):
    """:func:`fov_scoring_patches` of every FOV of the split, concatenated: ``(meta, patches)``
    with ``patches`` ``{REAL: [N,pz,py,px], model: [N,pz,py,px], ...}`` (the patches of the whole
    split in memory; the scores go FOV by FOV instead)."""
    parts = list(fov_scoring_patches(stage_in, split, cfg, pred_dirs, reference))
    if not parts:
        raise _no_patch(split, cfg)
    return (pd.concat([m for m, _ in parts], ignore_index=True),
            {k: np.concatenate([p[k] for _, p in parts]) for k in parts[0][1]})


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
def _autocast(device: str, precision: str):
    if precision in ("32-true", "32"):
        return torch.autocast(device_type=torch.device(device).type, enabled=False)
    if precision == "bf16-mixed":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be '32-true' or 'bf16-mixed', got {precision!r}")


@torch.no_grad()
def predict(model, patches: np.ndarray, cfg: ClassifierConfig, device: str = "cpu", precision: str = "32-true",
            batch_size: int = 64) -> np.ndarray:
    """Class probabilities ``[N,6]`` of patches ``[N,pz,py,px]``."""
    model.eval().to(device)
    out = []
    for i in range(0, len(patches), batch_size):
        x = normalise(torch.from_numpy(patches[i:i + batch_size])[:, None].to(device), cfg.patch_norm)
        with _autocast(device, precision):
            out.append(torch.softmax(model(x).float(), 1).cpu())
    return torch.cat(out).numpy()


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
            with _autocast(device, precision):
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
# The perceptual distance
# ---------------------------------------------------------------------------------------------
def _unit(f: torch.Tensor) -> torch.Tensor:
    return f / (f.norm(dim=1, keepdim=True) + 1e-10)


def lpips(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS-style distance ``[N]`` between two lists of :func:`features`: at each layer the
    activations are unit-normalised along channels at every voxel, the squared Euclidean distance
    is averaged over voxels, and the layers are averaged with equal weights (LPIPS learns these
    weights; here they are uniform). 0 for identical inputs, at most 4."""
    d = sum(((_unit(a) - _unit(b)) ** 2).sum(1).mean((1, 2, 3)) for a, b in zip(feats_a, feats_b))
    return d / len(feats_a)


@torch.no_grad()
def classify_and_compare(model, real: np.ndarray, fakes: dict[str, np.ndarray], cfg: ClassifierConfig,
                         device: str = "cpu", precision: str = "32-true", batch_size: int = 64):
    """One pass over aligned patch sets ``[N,pz,py,px]``: the class the classifier gives each real and
    each generated patch, and each generated patch's :func:`lpips` distance to its measured patch.

    Returns ``(classes, distances)``: dicts ``{REAL: [N], model: [N]}`` and ``{model: [N]}``."""
    model.eval().to(device)
    cls = {k: [] for k in (REAL, *fakes)}
    dist = {k: [] for k in fakes}
    for i in range(0, len(real), batch_size):
        sets = {REAL: real, **fakes}
        feats = {}
        for k, arr in sets.items():
            x = normalise(torch.from_numpy(arr[i:i + batch_size])[:, None].to(device), cfg.patch_norm)
            with _autocast(device, precision):
                f = features(model, x)
                logits = model.fc(model.avgpool(f[-1]).flatten(1))
            feats[k] = [t.float() for t in f]
            cls[k].append(logits.float().argmax(1).cpu())
        for k in fakes:
            dist[k].append(lpips(feats[REAL], feats[k]).cpu())
    return ({k: torch.cat(v).numpy() for k, v in cls.items()}, {k: torch.cat(v).numpy() for k, v in dist.items()})


def perceptual_distance(model, real: np.ndarray, fake: np.ndarray, cfg: ClassifierConfig, device: str = "cpu",
                        batch_size: int = 64) -> np.ndarray:
    """The :func:`lpips` distance ``[N]`` of each patch of ``fake`` to the patch of ``real`` at the
    same index (both ``[N,pz,py,px]``)."""
    return classify_and_compare(model, real, {"fake": fake}, cfg, device, batch_size=batch_size)[1]["fake"]


# ---------------------------------------------------------------------------------------------
# Stages
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
            raise _no_patch(split, cfg)
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


def score_models(model, cfg: ClassifierConfig, stage_in, pred_dirs: dict[str, str | Path], split: str = "test",
                 reference: str = "target", device: str = "cpu", precision: str = "32-true") -> pd.DataFrame:
    """Classify measured patches and each model's generated patches at the same places, and measure the
    perceptual distance of each generated patch to its real one.

    Returns one row per patch and model (``REAL`` for the measured patches): ``model, fov_id, channel,
    class, z, y, x, predicted, perceptual`` (``perceptual`` is 0 for measured patches), measured patches
    first, then each model's. Scored FOV by FOV: one FOV's volumes and patches in memory at a time."""
    frames = {m: [] for m in (REAL, *pred_dirs)}
    for meta, p in fov_scoring_patches(stage_in, split, cfg, pred_dirs, reference):
        classes, dist = classify_and_compare(model, p[REAL], {m: p[m] for m in pred_dirs}, cfg, device, precision)
        for m in p:
            f = meta.copy()
            f.insert(0, "model", m)
            f["predicted"] = classes[m]
            f["perceptual"] = 0.0 if m == REAL else dist[m]
            frames[m].append(f)
    if not frames[REAL]:
        raise _no_patch(split, cfg)
    return pd.concat([f for m in frames for f in frames[m]], ignore_index=True)


def summarise_scores(scores: pd.DataFrame, classes=TARGETS) -> pd.DataFrame:
    """Per ``(channel, model)``: ``f1clf`` (per-class F1 over that model's patches),
    ``perceptual_mean`` and ``perceptual_std`` (over patches) and ``n_patches``."""
    rows = []
    for m, g in scores.groupby("model", sort=False):
        f1 = f1_scores(confusion(g["class"], g["predicted"], len(classes)))
        for c, name in enumerate(classes):
            gc = g[g["class"] == c]
            if gc.empty:
                continue
            rows.append({"channel": name, "model": m, "f1clf": float(f1[c]),
                         "perceptual_mean": float(gc["perceptual"].mean()),
                         "perceptual_std": float(gc["perceptual"].std(ddof=0)), "n_patches": int(len(gc))})
    return pd.DataFrame(rows).set_index(["channel", "model"])


def confusion_by_model(scores: pd.DataFrame, classes=TARGETS) -> dict[str, np.ndarray]:
    """Confusion matrices (counts, row = true channel) per model of a :func:`score_models` table."""
    return {m: confusion(g["class"], g["predicted"], len(classes)) for m, g in scores.groupby("model", sort=False)}
