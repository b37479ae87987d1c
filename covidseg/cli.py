"""The ``covidseg`` command: phantom, download, train, evaluate, predict, screen.

Every problem with the user's input ends in one line ``covidseg: error: ...`` naming the file and
the problem, and a non-zero exit status, never a Python traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import traceback
from pathlib import Path

from .config import PRESETS, TrainConfig, get_preset
from .errors import CheckpointError, CovidsegError, DataError

__all__ = ["main", "build_parser"]

EXIT_BUG = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

MODEL_SIZE_MULTIPLE = {"unet": 16}
"""In-plane sizes must be a multiple of this (the U-Net's 4 poolings); smp's encoders need 32."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``covidseg: error: ...``, like all others."""

    def error(self, message: str):
        command = self.prog.removeprefix("covidseg").strip()
        where = f"{command}: " if command else ""
        hint = f"see 'covidseg {command} --help'" if command else "see 'covidseg --help'"
        self.exit(EXIT_ERROR, f"covidseg: error: {where}{' '.join(message.split())} ({hint})\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _slices(text: str) -> int | str:
    return "all" if text.strip().lower() == "all" else _positive_int(text)


def _device(text: str) -> str:
    import torch

    if text != "auto":
        try:
            torch.device(text)
        except (RuntimeError, ValueError):
            raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``covidseg`` command and its subcommands."""
    from .models import MODEL_NAMES
    from .splits import SPLIT_NAMES

    parser = _Parser(
        prog="covidseg",
        description="COVID-19 lung-lesion segmentation on chest CT (MosMedData), reproducibly.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    phantom = commands.add_parser("phantom", help="write the synthetic chest-CT phantom in MosMedData's layout")
    phantom.add_argument("out", type=Path, help="output folder")
    phantom.add_argument("--size", type=_positive_int, default=512, help="in-plane size in pixels (default 512)")
    phantom.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    download = commands.add_parser("download", help="download and verify the 50 annotated MosMedData studies")
    download.add_argument("out", type=Path, help="output folder")
    download.add_argument("--mirror", default=None, help="base URL of the mirror (default: the pinned GitHub mirror)")
    download.add_argument("--categories", default=None, metavar="CT-0,CT-1,...|all", help="download these categories of all 1110 studies (default: the 50 annotated CT-1 studies)")
    download.add_argument("--per-category", type=_positive_int, default=None, metavar="N", help="with --categories: a seeded sample of N studies of each")
    download.add_argument("--seed", type=int, default=0, help="seed of the --per-category sample (default 0)")

    train = commands.add_parser("train", help="train a model with early stopping")
    train.add_argument("--data", type=Path, default=None, help="MosMedData folder (default: $COVIDSEG_DATA or the phantom)")
    train.add_argument("--model", required=True, choices=MODEL_NAMES)
    train.add_argument("--out", type=Path, required=True, help="run folder for checkpoints and history")
    train.add_argument("--preset", choices=sorted(PRESETS), default="thesis")
    train.add_argument("--split", choices=SPLIT_NAMES, default=None)
    train.add_argument("--epochs", type=_positive_int, default=None, help="maximum epochs")
    train.add_argument("--image-size", type=_positive_int, default=None, help="in-plane size slices are resized to")
    train.add_argument("--unet-width", type=_positive_int, default=None, help="channels of the first level of 'unet'")
    train.add_argument("--batch-size", type=_positive_int, default=None)
    train.add_argument(
        "--slices-per-epoch", type=_slices, default=None, metavar="N|all", help="training slices drawn per epoch (default: the preset's)"
    )
    train.add_argument("--lr", type=_positive_float, default=None)
    train.add_argument("--loss", choices=("dice", "bce-dice"), default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--device", type=_device, default=None, help="auto (default), cpu, cuda or mps")
    train.add_argument(
        "--encoder-weights",
        default=None,
        metavar="imagenet|none|PATH",
        help="encoder initialisation for smp models (default: the preset's)",
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed epoch")
    train.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")

    evaluate = commands.add_parser("evaluate", help="score a trained run on a part of its split")
    evaluate.add_argument("--data", type=Path, default=None)
    evaluate.add_argument("--run", type=Path, required=True)
    evaluate.add_argument("--part", choices=("train", "val", "test"), default="test")
    evaluate.add_argument("--json", type=Path, default=None, help="also write the scores and run card as JSON")
    evaluate.add_argument("--device", type=_device, default="auto")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")

    predict = commands.add_parser("predict", help="segment a CT study (NIfTI, HU) and write its lesion mask")
    predict.add_argument("--run", type=Path, required=True)
    predict.add_argument("input", type=Path, metavar="IN.nii.gz")
    predict.add_argument("output", type=Path, metavar="OUT.nii.gz")
    predict.add_argument("--device", type=_device, default="auto")
    predict.add_argument("--batch-size", type=_positive_int, default=8)
    predict.add_argument("--lungs-box", action="store_true",
                         help="predict only inside the box around the lungs: faster, but not the same mask (see benchmarks/README.md)")
    predict.add_argument("--lungs", choices=("classical", "lungmask"), default="classical", help="lung method for the involvement (default classical)")
    predict.add_argument("--lungs-out", type=Path, default=None, metavar="LUNGS.nii.gz", help="also write the lung mask (1 right, 2 left)")
    predict.add_argument("--json", type=Path, default=None, help="also write volumes, involvement and category as JSON")

    screen = commands.add_parser("screen", help="lungs, lesions, involvement and category of every study of a folder, into a CSV")
    screen.add_argument("data", type=Path, metavar="DATA", help="MosMedData folder or folder of NIfTI studies")
    screen.add_argument("--run", "--model-run", dest="run", type=Path, required=True,
                        help="the training run (under torchrun, whose own --run-path takes --run, write --model-run)")
    screen.add_argument("--out", type=Path, required=True, metavar="OUT.csv", help="the CSV; a rerun screens only the studies missing from it")
    screen.add_argument("--lungs", choices=("classical", "lungmask"), default="classical")
    screen.add_argument("--device", type=_device, default="auto")
    screen.add_argument("--batch-size", type=_positive_int, default=8)
    screen.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of ``covidseg train``: the preset, then the flags given.

    ``--encoder-weights none`` (any case) means random initialisation (``None``); without the
    flag the preset's choice stands.

    Raises:
        ValueError: If the image size does not suit the model.
    """
    changes = {
        "model": args.model,
        "split": args.split,
        "max_epochs": args.epochs,
        "image_size": args.image_size,
        "unet_width": args.unet_width,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "loss": args.loss,
        "seed": args.seed,
        "device": args.device,
    }
    config = get_preset(args.preset).replace(**{k: v for k, v in changes.items() if v is not None})
    if args.slices_per_epoch is not None:
        config = config.replace(slices_per_epoch=None if args.slices_per_epoch == "all" else args.slices_per_epoch)
    if args.encoder_weights is not None:
        weights = args.encoder_weights
        config = config.replace(encoder_weights=None if weights.strip().lower() == "none" else weights)
    multiple = MODEL_SIZE_MULTIPLE.get(config.model, 32)
    if config.image_size % multiple:
        raise ValueError(f"--image-size {config.image_size} must be a multiple of {multiple} for model {config.model!r}")
    return config


def _phantom(args) -> None:
    from .phantom import write_phantom

    print(f"writing a SYNTHETIC chest-CT phantom (not patient data) to {args.out}")
    studies = write_phantom(args.out, size=args.size, seed=args.seed)
    print(f"{len(studies)} synthetic studies written in MosMedData's layout to {args.out}")


def _download(args) -> None:
    from .download import CREDIT, DEFAULT_MIRROR, download

    print(CREDIT)
    if args.categories is None and args.per_category is not None:
        raise ValueError("--per-category needs --categories")
    if args.categories is not None:
        from .selection import download_selection, parse_categories

        paths = download_selection(args.out, parse_categories(args.categories), args.per_category, args.seed, args.mirror)
    else:
        paths = download(args.out, mirror=args.mirror or DEFAULT_MIRROR)
    print(f"{len(paths)} files downloaded and verified in {args.out}")
    print(f"use them with: export COVIDSEG_DATA={args.out}")


def _train(args) -> None:
    from .training import fit

    config = config_from_args(args)
    result = fit(config, args.out, data_dir=args.data, resume=args.resume, progress=not args.quiet)
    stop = "early stopping" if result.stopped_early else "epoch limit"
    print(f"best validation per-study Dice {result.best_val_dice:.4f} at epoch {result.best_epoch + 1} ({stop})")
    print(result.card)


def _evaluate(args) -> None:
    from .evaluation import evaluate_run, format_report

    report = evaluate_run(args.run, args.data, args.part, args.device, args.json, progress=not args.quiet)
    print(format_report(report))


def _predict(args) -> None:
    from .nifti import check_output_path, load_volume
    from .prediction import predict_file

    # Cheap checks first, so a bad path fails before the model is loaded.
    if not args.run.is_dir():
        raise CheckpointError(args.run, "run folder not found (train one with 'covidseg train')")
    check_output_path(args.output)
    if args.output.exists() and args.input.exists() and args.output.samefile(args.input):
        raise DataError(args.output, "is the input study; writing the mask there would destroy it")
    if not args.input.is_file():
        load_volume(args.input)  # raises the DataError that says what the path is instead
    from .severity import check_severity_outputs, report_severity

    check_severity_outputs(args.input, args.output, args.lungs, args.lungs_out, args.json)
    volume_ml = predict_file(args.run, args.input, args.output, args.batch_size, args.device, args.lungs_box)
    print(f"lesion volume {volume_ml:.1f} mL; mask written to {args.output}")
    report_severity(args.input, args.output, args.lungs, args.lungs_out, args.json)


def _screen(args) -> None:
    from .screening import screen

    summary = screen(args.data, args.run, args.out, args.lungs, args.device, args.batch_size, progress=not args.quiet)
    if summary.report:
        print(f"{summary.screened} studies screened, {summary.skipped} already done, {summary.errors} with an error; CSV written to {summary.out}")
        print(summary.report)


def _interrupted(args, argv: list[str], exc: KeyboardInterrupt) -> str:
    """The message printed on Ctrl-C: what is saved, and the command that continues."""
    from .training import TrainingInterrupted

    if args.command in ("evaluate", "predict"):
        return "covidseg: interrupted; no output was written"
    if args.command == "screen":
        return f"covidseg: interrupted; the studies done are kept: {shlex.join(['covidseg', *argv])} finishes the rest"
    if args.command != "train" or not isinstance(exc, TrainingInterrupted):
        return "covidseg: interrupted"
    again = ["covidseg", *argv] + ([] if "--resume" in argv else ["--resume"])
    if exc.saved_epoch is None:
        return f"covidseg: {exc}; start again with: {shlex.join(['covidseg', *argv])}"
    return f"covidseg: {exc}: {shlex.join(again)}"


def _unexpected(exc: BaseException) -> str:
    """One line for an error covidseg did not foresee; the traceback goes to a file."""
    first = " ".join(str(exc).split())[:300] or "no message"
    try:
        fd, name = tempfile.mkstemp(prefix="covidseg-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as handle:
            traceback.print_exception(exc, file=handle)
        where = f"the traceback is in {name}"
    except OSError:
        where = "the traceback could not be saved"
    return f"covidseg: error: unexpected {type(exc).__name__}: {first} (a bug in covidseg? please report it; {where})"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``covidseg`` console script.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a problem with the input (one line on stderr,
        ``covidseg: error: <file>: <problem>``), 130 after Ctrl-C, 1 for an unexpected error
        (one line; the traceback is saved to a file it names).
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed on one line
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else EXIT_ERROR
    handler = {"phantom": _phantom, "download": _download, "train": _train, "evaluate": _evaluate, "predict": _predict, "screen": _screen}[args.command]
    try:
        handler(args)
    except CovidsegError as exc:
        print(f"covidseg: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        print(f"\n{_interrupted(args, argv, exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValueError as exc:  # invalid names and options reported by the library
        print(f"covidseg: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # e.g. an output folder that is read-only or a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"covidseg: error: {where}{' '.join(str(exc.strerror or exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:
        print("covidseg: error: out of memory; try a smaller --batch-size or --image-size", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback
        if _is_out_of_memory(exc):
            resume = "; a run that completed an epoch continues with --resume" if args.command == "train" else ""
            print(f"covidseg: error: out of GPU memory; try a smaller --batch-size or --image-size{resume}", file=sys.stderr)
            return EXIT_ERROR
        print(_unexpected(exc), file=sys.stderr)
        return EXIT_BUG
    return 0


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


if __name__ == "__main__":
    sys.exit(main())
