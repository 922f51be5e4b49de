"""The command line: ``python -m vstain predict MODEL INPUT... -o OUTDIR`` applies a trained model to
brightfield stacks (:mod:`vstain.inference.predict`); ``python -m vstain export MODEL -o model.zip`` writes a
bioimage.io model package (:mod:`vstain.inference.export`) for Fiji, ilastik, napari and other consumers."""
from __future__ import annotations

import argparse
import sys
import warnings

from vstain.inference.infer import DEFAULT_BUDGET_BYTES


def _predict(args) -> int:
    from vstain.inference.predict import load_model, predict_files

    model = load_model(args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
        written, failed = predict_files(model, args.inputs, args.output, args.channel, args.focus_window,
                                        args.resample, args.tta, args.max_memory, progress=not args.quiet,
                                        scratch=args.scratch)
    for p in written:
        print(f"wrote {p}")
    if failed:
        print(f"{len(failed)} of {len(failed) + len(written)} input(s) could not be predicted:", file=sys.stderr)
        for _, reason in failed:
            print(f"  {reason}", file=sys.stderr)
        return 1
    return 0


def _export(args) -> int:
    from vstain.inference.export import export_bioimageio

    voxel = tuple(args.voxel_size) if args.voxel_size else None
    out = export_bioimageio(args.model, args.output, voxel_size_zyx=voxel, name=args.name)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vstain", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict the six fluorescence channels of brightfield stacks")
    p.add_argument("model", help="a 04_unet / 05_wgan stage folder or an exported bioimage.io package (.zip)")
    p.add_argument("inputs", nargs="+", help="OME-TIFF / TIFF files or folders of them")
    p.add_argument("-o", "--output", required=True, help="folder for the predictions (created)")
    p.add_argument("--channel", default=None,
                   help="brightfield channel: index or OME channel name (default: the only channel, or one named *bright*)")
    p.add_argument("--focus-window", type=int, default=None, metavar="N",
                   help="keep the N in-focus slices found by PLLS (the thesis used 32)")
    p.add_argument("--resample", action="store_true",
                   help="resample to the training voxel size when it differs by more than 10%% (and back)")
    p.add_argument("--tta", action="store_true",
                   help="average the Y/X flips and write their per-voxel standard deviation as uncertainty channels")
    p.add_argument("--max-memory", default=f"{DEFAULT_BUDGET_BYTES // 2**30}GiB",
                   help="activation memory for one forward pass; larger stacks are tiled (default %(default)s)")
    p.add_argument("--scratch", default=None, metavar="DIR",
                   help="folder for the scratch files of stacks over --max-memory, predicted layer by layer "
                        "(default: the system's temporary folder)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)
    e = sub.add_parser("export", help="write a bioimage.io model package")
    e.add_argument("model", help="a 04_unet / 05_wgan stage folder")
    e.add_argument("-o", "--output", required=True, help="the package file to write (.zip)")
    e.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"),
                   help="training voxel size in µm (default: read from the run directory's 01_data)")
    e.add_argument("--name", default=None, help="the package's name")
    e.set_defaults(func=_export)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
