"""The ``covidseg`` command: phantom, download, train, evaluate, predict.

Every problem with the user's input ends in one line ``covidseg: error: ...`` naming the file and
the problem, and a non-zero exit status, never a Python traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import PRESETS, TrainConfig, get_preset
from .errors import CovidsegError

__all__ = ["main", "build_parser"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from .models import MODEL_NAMES
    from .splits import SPLIT_NAMES

    parser = argparse.ArgumentParser(
        prog="covidseg",
        description="COVID-19 lung-lesion segmentation on chest CT (MosMedData), reproducibly.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    phantom = commands.add_parser("phantom", help="write the synthetic chest-CT phantom in MosMedData's layout")
    phantom.add_argument("out", type=Path, help="output folder")
    phantom.add_argument("--size", type=int, default=512, help="in-plane size in pixels (default 512)")
    phantom.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    download = commands.add_parser("download", help="download and verify the 50 annotated MosMedData studies")
    download.add_argument("out", type=Path, help="output folder")
    download.add_argument("--mirror", default=None, help="base URL of the mirror (default: the pinned GitHub mirror)")

    train = commands.add_parser("train", help="train a model with early stopping")
    train.add_argument("--data", type=Path, default=None, help="MosMedData folder (default: $COVIDSEG_DATA or the phantom)")
    train.add_argument("--model", required=True, choices=MODEL_NAMES)
    train.add_argument("--out", type=Path, required=True, help="run folder for checkpoints and history")
    train.add_argument("--preset", choices=sorted(PRESETS), default="thesis")
    train.add_argument("--split", choices=SPLIT_NAMES, default=None)
    train.add_argument("--epochs", type=int, default=None, help="maximum epochs")
    train.add_argument("--image-size", type=int, default=None, help="in-plane size slices are resized to")
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--loss", choices=("dice", "bce-dice"), default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--device", default=None, help="auto (default), cpu, cuda or mps")
    train.add_argument(
        "--encoder-weights", default="imagenet", metavar="imagenet|none|PATH", help="encoder initialisation for smp models"
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed epoch")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    evaluate = commands.add_parser("evaluate", help="score a trained run on a part of its split")
    evaluate.add_argument("--data", type=Path, default=None)
    evaluate.add_argument("--run", type=Path, required=True)
    evaluate.add_argument("--part", choices=("train", "val", "test"), default="test")
    evaluate.add_argument("--json", type=Path, default=None, help="also write the scores and run card as JSON")
    evaluate.add_argument("--device", default="auto")

    predict = commands.add_parser("predict", help="segment a CT study (NIfTI, HU) and write its lesion mask")
    predict.add_argument("--run", type=Path, required=True)
    predict.add_argument("input", type=Path, metavar="IN.nii.gz")
    predict.add_argument("output", type=Path, metavar="OUT.nii.gz")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--batch-size", type=int, default=8)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of ``covidseg train``: the preset, then the flags given."""
    weights = args.encoder_weights
    changes = {
        "model": args.model,
        "encoder_weights": None if weights.lower() == "none" else weights,
        "split": args.split,
        "max_epochs": args.epochs,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "loss": args.loss,
        "seed": args.seed,
        "device": args.device,
    }
    config = get_preset(args.preset)
    return config.replace(**{k: v for k, v in changes.items() if v is not None or k == "encoder_weights"})


def _phantom(args) -> None:
    from .phantom import write_phantom

    print(f"writing a SYNTHETIC chest-CT phantom (not patient data) to {args.out}")
    studies = write_phantom(args.out, size=args.size, seed=args.seed)
    print(f"{len(studies)} synthetic studies written in MosMedData's layout to {args.out}")


def _download(args) -> None:
    from .download import CREDIT, DEFAULT_MIRROR, download

    print(CREDIT)
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

    report = evaluate_run(args.run, args.data, args.part, args.device, args.json)
    print(format_report(report))


def _predict(args) -> None:
    from .prediction import predict_file

    volume_ml = predict_file(args.run, args.input, args.output, args.batch_size, args.device)
    print(f"lesion volume {volume_ml:.1f} mL; mask written to {args.output}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``covidseg`` console script."""
    args = build_parser().parse_args(argv)
    handler = {"phantom": _phantom, "download": _download, "train": _train, "evaluate": _evaluate, "predict": _predict}[args.command]
    try:
        handler(args)
    except CovidsegError as exc:
        print(f"covidseg: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:  # invalid names and options reported by the library
        print(f"covidseg: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # e.g. an output folder that is read-only or a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"covidseg: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        hint = f"; continue with: covidseg train ... --out {args.out} --resume" if args.command == "train" else ""
        print(f"\ncovidseg: interrupted; the last completed epoch is saved{hint}" if hint else "\ncovidseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
