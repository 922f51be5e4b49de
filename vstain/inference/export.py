"""A trained generator as a bioimage.io model package (model spec 0.5), and back.

Sits after the model stages (``04_unet``, ``05_wgan``): :func:`export_bioimageio` turns a stage
folder (or a :class:`~vstain.models.Generator`) into one zip that bioimage.io consumers
(bioimageio.core, deepImageJ, ilastik, ...) can run: PyTorch state-dict weights (architecture
:func:`generator_from_config`, so ``vstain`` must be importable) and TorchScript weights (no
``vstain`` needed), the training voxel size, per-sample z-scoring as preprocessing, a test
input/output pair computed by the model, a cover image and a README. :func:`load_package` turns a
package back into a generator and its metadata; :func:`check_package` runs bioimageio.core's model
test. Nothing here touches the network: the one URL in the package (the thesis' repository) is
declared known to bioimageio's validation, which otherwise requests every URL it meets.
bioimageio.spec 0.5.12 needs pydantic < 2.14 to write and test a package (it calls pydantic's wrap
handler with an index key that pydantic 2.14 rejects), so the lock pins pydantic 2.13.
"""
from __future__ import annotations

import copy
import json
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from bioimageio.core import test_model
from bioimageio.core.backends.pytorch_backend import load_torch_model
from bioimageio.spec import ValidationContext, load_model_description, save_bioimageio_package
from bioimageio.spec.model import v0_5 as bio
from matplotlib.figure import Figure
from torch import Tensor, nn

from vstain.channels import TARGET_LABELS, TARGETS
from vstain.data.stage import voxel_size
from vstain.modelfiles import load_generator, simulated_data_warning, trained_on
from vstain.models import MIN_SIZE, SIZE_MULTIPLE, Generator, GeneratorConfig, num_params
from vstain.preprocess import processed

INPUT_ID, OUTPUT_ID = "brightfield", "fluorescence"
SPATIAL = ("z", "y", "x")
EPS = 1e-6  # (x - mean) / (std + eps): vstain.preprocess.processed.zscore in training, the package's preprocessing
THESIS = ("L. Venieri. Generative Adversarial Networks for Three-Dimensional Multi-Channel Virtual "
          "Fluorescent Staining. Master thesis, University of Bologna, 2023.")
THESIS_URL = "https://amslaurea.unibo.it/"  # the University of Bologna's thesis repository
CITE = (
    bio.CiteEntry(text=THESIS, url=THESIS_URL),
    bio.CiteEntry(text="Ounkomol et al. Label-free prediction of three-dimensional fluorescence images "
                       "from transmitted-light microscopy. Nature Methods 15, 917-920 (2018).",
                  doi="10.1038/s41592-018-0111-2"),
    bio.CiteEntry(text="Viana et al. Integrated intracellular organization and its variations in human "
                       "iPS cells. Nature 613, 345-354 (2023) (the Allen Cell hiPSC dataset).",
                  doi="10.1038/s41586-022-05563-7"),
)
KNOWN_URLS = {THESIS_URL: None}  # bioimageio validation skips the request for these
MODEL_KINDS = {"unet": "U-Net", "wgan": "WGAN-GP"}
TRAINING_SOURCES = ("synthetic", "allen", "unknown")


def generator_from_config(**kwargs) -> Generator:
    """The architecture callable of the state-dict weights: ``Generator(GeneratorConfig(**kwargs))``
    (bioimage.io passes plain YAML keyword arguments, not a config object)."""
    return Generator(GeneratorConfig(**kwargs))


@dataclass
class PackageInfo:
    """What :func:`load_package` reads from a package besides the weights.

    Args:
        name: the package's name.
        voxel_size_zyx: training voxel size ``(z, y, x)`` in µm (the input axes' scale).
        channel_names: output channels in order (:data:`vstain.channels.TARGETS`).
        generator: the :class:`GeneratorConfig` fields.
        trained_on: ``"synthetic"``, ``"allen"`` or ``"unknown"``.
        global_step: optimiser steps of its training, when recorded.
    """

    name: str
    voxel_size_zyx: tuple[float, float, float]
    channel_names: list[str]
    generator: dict
    trained_on: str
    global_step: int | None = None


# --------------------------------------------------------------------------------------------
# What a stage folder says about its model
# --------------------------------------------------------------------------------------------
def stage_info(stage_path) -> dict:
    """A model stage's ``model.json`` facts and, from the run directory's ``01_data`` stage, the
    training data's source and voxel size: ``model`` (``unet``/``wgan``), ``global_step``,
    ``trained_on`` (``synthetic``/``allen``/``unknown``), ``voxel_size_zyx`` (µm, or None) and
    ``processed`` (the ``03_denoising`` folder, or None)."""
    stage_path = Path(stage_path)
    meta = json.loads((stage_path / "model.json").read_text())
    run_dir = stage_path.parent
    fovs = run_dir / "01_data" / "fovs.csv"
    voxel = None
    if fovs.exists():
        try:
            voxel = voxel_size(fovs.parent)
        except ValueError as e:
            raise ValueError(f"{e}; pass voxel_size_zyx explicitly") from e
    processed_dir = run_dir / "03_denoising"
    return {"model": meta.get("model", "unknown"), "global_step": meta.get("global_step"),
            "trained_on": trained_on(stage_path), "voxel_size_zyx": voxel,
            "processed": processed_dir if (processed_dir / processed.MANIFEST_CSV).exists() else None}


def default_test_input(processed_dir, shape=(16, 64, 64), seed: int = 0) -> np.ndarray:
    """A brightfield ``[1, Z, Y, X]`` test input: the central crop (multiples of 8, at most
    ``shape``) of the processed set's first test FOV, or seeded Gaussian noise without one."""
    if processed_dir is None:
        return np.random.default_rng(seed).standard_normal((1, *shape)).astype(np.float32)
    rows = processed.read_manifest(processed_dir)
    test = rows[rows["split"] == "test"]
    x, _, _ = processed.load_fov((test if len(test) else rows).iloc[0])
    size = [max(MIN_SIZE, min(s, n) // SIZE_MULTIPLE * SIZE_MULTIPLE) for s, n in zip(shape, x.shape[1:])]
    lo = [(n - s) // 2 for s, n in zip(size, x.shape[1:])]
    return np.ascontiguousarray(x[:, lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]])


# --------------------------------------------------------------------------------------------
# TorchScript: the traced network inside a scripted reflect-pad / crop
# --------------------------------------------------------------------------------------------
class PadCrop(nn.Module):
    """TorchScript form of :class:`Generator`'s size handling: reflect-pad ``N C Z Y X`` to a
    multiple of 8 (split as :func:`vstain.models.pad_to_multiple` does), run ``core`` (the
    generator traced on a multiple of 8) and crop back. Raises for an axis under 8 voxels."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or min(x.shape[2], x.shape[3], x.shape[4]) < 8:
            raise ValueError("input must be N C Z Y X with every spatial axis >= 8 voxels")
        lo: list[int] = []
        hi: list[int] = []
        for n in x.shape[2:]:
            extra = (8 - n % 8) % 8
            lo.append(extra // 2)
            hi.append(extra - extra // 2)
        x = F.pad(x, [lo[2], hi[2], lo[1], hi[1], lo[0], hi[0]], mode="reflect")
        out = self.core(x)
        return out[:, :, lo[0]:out.shape[2] - hi[0], lo[1]:out.shape[3] - hi[1], lo[2]:out.shape[4] - hi[2]]


def to_torchscript(generator: Generator) -> torch.jit.ScriptModule:
    """A TorchScript module that predicts as ``generator`` does on any ``N, 1, Z, Y, X`` input
    with Z, Y, X >= 8. The network is traced on 16^3 voxels (its size handling is Python that
    tracing would freeze) and wrapped in the scripted :class:`PadCrop`."""
    gen = copy.deepcopy(generator).cpu().eval()  # the caller's module keeps its device and mode
    with torch.no_grad(), warnings.catch_warnings():
        # the size checks and padding that tracing freezes are exactly what PadCrop takes over;
        # torch.jit is deprecated in favour of torch.export, which bioimage.io does not read
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        core = torch.jit.trace(gen, torch.zeros(1, gen.cfg.in_channels, 16, 16, 16), check_trace=False)
        return torch.jit.script(PadCrop(core))


# --------------------------------------------------------------------------------------------
# Package contents
# --------------------------------------------------------------------------------------------
def write_cover(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """A 2:1 PNG: the brightfield's middle slice and the six predicted channels' (``x [1,Z,Y,X]``,
    ``y [6,Z,Y,X]``)."""
    fig = Figure(figsize=(8, 4), dpi=100)
    axes = fig.subplots(2, 4)
    z = x.shape[1] // 2
    panels = [("Brightfield (input)", x[0, z], "gray")] + [
        (TARGET_LABELS[t], y[i, z], "magma") for i, t in enumerate(TARGETS)]
    for ax, (title, img, cmap) in zip(axes.flat, panels):
        ax.imshow(img, cmap=cmap)
        ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"Virtual staining of the test input, slice z = {z}", fontsize=10)
    fig.savefig(path)
    return path


def write_readme(path: Path, name: str, generator: Generator, voxel, info: dict) -> Path:
    """The package's documentation: what the model is, its data, voxel size, limits, validation."""
    source = {"synthetic": "Simulated hiPSC fields of view (vstain.data.simulate) in the Allen Cell layout",
              "allen": "Real fields of view of the Allen Cell hiPSC single-cell image dataset (Viana et al. 2023)"}
    trained = source.get(info["trained_on"], "Data not recorded with the weights")
    kind = MODEL_KINDS.get(info["model"], "generator")
    step = f" for {info['global_step']} optimiser steps" if info.get("global_step") else ""
    channels = "\n".join(f"  {i}. `{t}`: {TARGET_LABELS[t]}" for i, t in enumerate(TARGETS, 1))
    text = f"""# {name}

A 3D U-Net generator (depth 3, base width {generator.cfg.base_width}, {num_params(generator):,} parameters;
the thesis uses width 64, 23.1 M) that predicts six fluorescence channels from a brightfield z-stack,
trained as the {kind} of the executable reproduction `vstain` of {THESIS}

## Input and output

- Input `{INPUT_ID}`: `batch, channel (1), z, y, x`, float32; z-scored per sample over z, y, x by the
  package's preprocessing (zero mean, unit variance), as in training.
- Output `{OUTPUT_ID}`: `batch, channel (6), z, y, x`, same z, y, x as the input, each channel in the
  z-scored units of its training target:
{channels}
- Voxel size (z, y, x): {voxel[0]:g}, {voxel[1]:g}, {voxel[2]:g} µm. Images at another voxel size must be
  resampled to it first.
- Sizes: the package declares 8 + 8n voxels per axis; the network itself takes any size of at least
  8 (it reflect-pads to a multiple of 8 and crops back), so a whole field of view runs in one pass.

## Training data

{trained}{step}; loss: masked L1{' and the WGAN-GP critic' if info['model'] == 'wgan' else ''} (thesis 3.2).

## Limits

- {simulated_data_warning(voxel, generator.cfg.base_width, info.get('global_step'), sentence=True)
   if info['trained_on'] == 'synthetic'
   else 'Trained on one cell type (hiPSC), one microscope and one voxel size; other samples are out of distribution.'}
- The outputs are predictions, not measurements: in the thesis (Table 4.1) the cell membrane and
  actomyosin channels agree least with their targets (Pearson r 0.65 and 0.7 for the U-Net). The
  model gives no uncertainty; `vstain.inference.tta` gives a flip test-time spread as a rough one.
- Each training FOV labels only its own tagged structure (plus DNA and membrane); channels are
  learnt from fewer FOVs than the two common ones.
- The weights in `pytorch_state_dict` need the `vstain` package (`vstain.inference.export.generator_from_config`);
  the TorchScript weights need only PyTorch.

## Validation

Predict held-out fields of view and compare each channel with its fluorescence target where the
FOV carries that label: SSIM, MSE, MAE and Pearson r per channel (notebook `07_results` of `vstain`
reproduces the thesis' Table 4.1 this way). The package's test input/output pair checks only that
the weights reproduce themselves.

## Citation

{THESIS}
"""
    path.write_text(text)
    return path


def _space_axes(voxel, ref: bool):
    size = (lambda a: bio.SizeReference(tensor_id=bio.TensorId(INPUT_ID), axis_id=bio.AxisId(a))) if ref \
        else (lambda a: bio.ParameterizedSize(min=MIN_SIZE, step=SIZE_MULTIPLE))
    cls = bio.SpaceOutputAxis if ref else bio.SpaceInputAxis
    return [cls(id=bio.AxisId(a), size=size(a), unit="micrometer", scale=float(s)) for a, s in zip(SPATIAL, voxel)]


# --------------------------------------------------------------------------------------------
# Export, load, test
# --------------------------------------------------------------------------------------------
def export_bioimageio(source, out_zip, voxel_size_zyx=None, test_input=None, *, name: str | None = None,
                      trained_on: str | None = None, authors=("vstain contributors",), license: str = "MIT",
                      seed: int = 0) -> Path:
    """Write a bioimage.io model package (zip, model spec 0.5) of a trained generator.

    Args:
        source: a model stage folder (``runs/<profile>/04_unet`` or ``05_wgan``: ``model.json`` and
            ``checkpoints/last.ckpt``) or a :class:`Generator`.
        out_zip: the package to write (``.zip``).
        voxel_size_zyx: training voxel size ``(z, y, x)`` in µm; default: the run directory's
            ``01_data/fovs.csv`` (required for a bare generator).
        test_input: brightfield ``[1, Z, Y, X]``, each axis 8 + 8n, not yet z-scored; default: a
            central crop of the processed set's first test FOV (noise without a processed set).
        name: the package's name (letters, digits, spaces, ``_+-()``); default from the stage.
        trained_on: one of :data:`TRAINING_SOURCES`; default from the run directory.
        authors: names of the package's authors.
        license: SPDX identifier (the project's: MIT).
        seed: seed of the noise test input.

    Returns:
        The written zip's path.
    """
    out_zip = Path(out_zip)
    if trained_on not in (None, *TRAINING_SOURCES):
        raise ValueError(f"trained_on must be one of {TRAINING_SOURCES}, got {trained_on!r}")
    if isinstance(source, Generator):
        gen, info = copy.deepcopy(source).cpu().eval(), {"model": "unknown", "global_step": None,
                                                         "trained_on": "unknown", "voxel_size_zyx": None,
                                                         "processed": None}
    else:
        if not (Path(source) / "model.json").exists():
            raise FileNotFoundError(f"{source}: not a model stage folder (no model.json); train 04_unet or 05_wgan first")
        gen, info = load_generator(source), stage_info(source)
    info["trained_on"] = trained_on or info["trained_on"]
    voxel = tuple(float(v) for v in (voxel_size_zyx or info["voxel_size_zyx"] or ()))
    if len(voxel) != 3 or min(voxel) <= 0:
        raise ValueError(f"voxel_size_zyx must be three positive sizes (z, y, x) in µm, got {voxel_size_zyx!r} "
                         f"(and none was found in the stage's run directory)")
    x = np.asarray(test_input if test_input is not None else default_test_input(info["processed"], seed=seed),
                   dtype=np.float32)
    if x.ndim != 4 or x.shape[0] != 1 or any(n < MIN_SIZE or n % SIZE_MULTIPLE for n in x.shape[1:]):
        raise ValueError(f"test_input must be [1, Z, Y, X] with Z, Y, X = 8 + 8n, got shape {x.shape}")
    name = name or f"vstain {MODEL_KINDS.get(info['model'], 'U-Net')} virtual staining width {gen.cfg.base_width}"
    with torch.no_grad():
        y = gen(torch.from_numpy(processed.zscore(x, EPS))[None]).numpy()  # [1, 6, Z, Y, X]

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        np.save(d / "test_input.npy", x[None])  # [1, 1, Z, Y, X]
        np.save(d / "test_output.npy", y)
        torch.save(gen.state_dict(), d / "weights.pt")
        to_torchscript(gen).save(str(d / "weights_torchscript.pt"))
        tifffile.imwrite(d / "sample_input.tif", x[0])  # [Z, Y, X], for viewers (.npy is for tests)
        tifffile.imwrite(d / "sample_output.tif", y[0])  # [6, Z, Y, X]
        write_cover(d / "cover.png", x, y[0])
        write_readme(d / "README.md", name, gen, voxel, info)
        torch_version = bio.Version(torch.__version__.split("+")[0])
        inp = bio.InputTensorDescr(
            id=bio.TensorId(INPUT_ID), description="brightfield z-stack",
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[INPUT_ID]), *_space_axes(voxel, ref=False)],
            test_tensor=bio.FileDescr(source=d / "test_input.npy"),
            sample_tensor=bio.FileDescr(source=d / "sample_input.tif"),
            preprocessing=[bio.ZeroMeanUnitVarianceDescr(kwargs=bio.ZeroMeanUnitVarianceKwargs(
                axes=[bio.AxisId(a) for a in SPATIAL], eps=EPS))])
        out = bio.OutputTensorDescr(
            id=bio.TensorId(OUTPUT_ID), description="six virtual fluorescence channels, z-scored units",
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=list(TARGETS)), *_space_axes(voxel, ref=True)],
            test_tensor=bio.FileDescr(source=d / "test_output.npy"),
            sample_tensor=bio.FileDescr(source=d / "sample_output.tif"))
        weights = bio.WeightsDescr(
            pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
                source=d / "weights.pt", pytorch_version=torch_version,
                architecture=bio.ArchitectureFromLibraryDescr(
                    import_from="vstain.inference.export", callable=bio.Identifier("generator_from_config"),
                    kwargs=asdict(gen.cfg))),
            torchscript=bio.TorchscriptWeightsDescr(
                source=d / "weights_torchscript.pt", pytorch_version=torch_version, parent="pytorch_state_dict",
                comment="traced generator in a scripted reflect-pad/crop (vstain.inference.export.PadCrop)"))
        with ValidationContext(known_files=dict(KNOWN_URLS)):
            descr = bio.ModelDescr(
                name=name, description="3D virtual fluorescent staining: six fluorescence channels "
                                       "(DNA, membrane, mitochondria, nuclear envelope, actomyosin, nucleoli) "
                                       "from a brightfield z-stack, after Venieri 2023.",
                authors=[bio.Author(name=a) for a in authors], cite=list(CITE), license=license,
                documentation=bio.FileDescr(source=d / "README.md"), covers=[bio.FileDescr(source=d / "cover.png")],
                tags=["3d", "virtual-staining", "label-free", "brightfield", "fluorescence", "unet", "pytorch"],
                inputs=[inp], outputs=[out], weights=weights,
                config=bio.Config(
                    bioimageio=bio.BioimageioConfig(
                        architecture_type="3D U-Net", modality="brightfield microscopy",
                        target_structure=[TARGET_LABELS[t] for t in TARGETS]),
                    vstain={"generator": asdict(gen.cfg), "trained_on": info["trained_on"], "model": info["model"],
                            "global_step": info["global_step"], "voxel_size_zyx": list(voxel)}))
            out_zip.parent.mkdir(parents=True, exist_ok=True)
            # saving re-reads the zip under a new root, which forgets the known URLs: that re-read
            # skips the I/O checks just done above (check_package runs them on the zip, offline)
            with warnings.catch_warnings(), ValidationContext(perform_io_checks=False):
                # bioimageio re-reads the dumped file entries without their root and warns for each
                warnings.filterwarnings("ignore", message="Found mapping with 'source'")
                return Path(save_bioimageio_package(descr, output_path=out_zip))


def load_package(path) -> tuple[Generator, PackageInfo]:
    """The generator (state-dict weights, eval mode, CPU) and metadata of a package written by
    :func:`export_bioimageio`, without network access or hashing."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such bioimage.io package (a .zip from vstain.inference.export)")
    descr = load_model_description(path, perform_io_checks=False)
    if not isinstance(descr, bio.ModelDescr):
        raise ValueError(f"{path}: not a bioimage.io model description of format 0.5 ({type(descr).__name__})")
    if descr.weights.pytorch_state_dict is None:
        raise ValueError(f"{path}: the package has no pytorch_state_dict weights")
    gen = load_torch_model(descr.weights.pytorch_state_dict, devices=["cpu"])
    if not isinstance(gen, Generator):
        raise ValueError(f"{path}: its architecture is {type(gen).__name__}, not vstain.models.Generator")
    axes = {str(a.id): a for a in descr.inputs[0].axes}
    channels = next(a for a in descr.outputs[0].axes if isinstance(a, bio.ChannelAxis)).channel_names
    extra = (descr.config.model_extra or {}).get("vstain", {})
    return gen.eval(), PackageInfo(name=descr.name, voxel_size_zyx=tuple(float(axes[a].scale) for a in SPATIAL),
                                   channel_names=list(channels), generator=asdict(gen.cfg),
                                   trained_on=extra.get("trained_on", "unknown"), global_step=extra.get("global_step"))


def check_package(path, weight_format: str | None = None):
    """bioimageio.core's model test of a package (format validation, reproduction of the test
    output for each weights format, inference at several sizes), offline. Returns the
    ``ValidationSummary`` (``.status`` is ``"passed"`` or ``"failed"``)."""
    descr = load_model_description(path, perform_io_checks=True, known_files=dict(KNOWN_URLS))
    return test_model(descr, weight_format=weight_format)
