"""The ``covidseg`` command: phantom, download, train, evaluate, predict, screen, cv.

Every problem with the user's input ends in one line ``covidseg: error: ...`` naming the file and
the problem, and a non-zero exit status, never a Python traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import traceback
from pathlib import Path

from .config import LUNG_METHOD_NAMES, PRESETS, ConfigError, TrainConfig, check_value, field_type, get_preset
from .errors import CheckpointError, CovidsegError, DataError
from .splits import Split

__all__ = ["main", "build_parser"]

EXIT_BUG = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

FLAG_ALIASES = {"max_epochs": ("--epochs",)}
"""Other spellings of the flags of ``covidseg train``, kept because earlier versions used them."""

_NOT_FLAGS = ("preset",)
"""TrainConfig fields not set by a flag of their own (``--preset`` chooses the preset itself)."""

PARTS = tuple(f.name for f in dataclasses.fields(Split) if f.name != "name")
"""The parts of a split ``covidseg evaluate`` can score: train, val, test."""

_REQUIRED = ("model",)
"""TrainConfig fields ``covidseg train`` asks for."""

CV_TIME_BUDGET_HELP = ("minutes for this whole call: each fold trains in the minutes the folds before it left, stopping "
                       "between epochs as 'covidseg train --time-budget' does; at least one epoch is trained, no other "
                       "fold starts once the minutes are spent, nothing is scored until every fold has finished, and "
                       "the same command continues; none: no budget")
"""The help of ``covidseg cv --time-budget``: one budget for all the folds of the call."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``covidseg: error: ...``, like all others."""

    def error(self, message: str):
        command = self.prog.removeprefix("covidseg").strip()
        where = f"{command}: " if command else ""
        hint = f"see 'covidseg {command} --help'" if command else "see 'covidseg --help'"
        self.exit(EXIT_ERROR, f"covidseg: error: {where}{' '.join(message.split())} ({hint})\n")


def flag_of(name: str) -> str:
    """The flag of a TrainConfig field: ``image_size`` -> ``--image-size``."""
    return "--" + name.replace("_", "-")


def _value_of(name: str):
    """An argparse ``type`` that reads a value of TrainConfig field ``name`` and checks it
    (:func:`covidseg.config.check_value`), so a bad value is reported naming the flag."""
    kind, meta = field_type(name), TrainConfig.__dataclass_fields__[name].metadata

    def parse(text: str):
        if "none" in meta and text.strip().lower() == meta["none"]:
            return None
        try:
            value = int(text) if kind is int else float(text) if kind is float else text
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole number' if kind is int else 'number'}, got {text!r}") from None
        try:
            return check_value(name, value)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(f"{exc.problem}, got {text}") from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _whole_number(low: int, high: int):
    """An argparse ``type`` for a whole number in ``[low, high]`` (flags that are not config fields)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def _add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (), helps: dict[str, str] | None = None) -> None:
    """One flag per :class:`TrainConfig` field, its help and valid values from the field's metadata.

    A flag not given leaves no attribute (``argparse.SUPPRESS``): the preset's value stands.
    Fields in ``exclude`` get no flag (the command sets them itself); ``helps`` replaces the help
    of fields that mean something else to this command.
    """
    for f in dataclasses.fields(TrainConfig):
        if f.name in _NOT_FLAGS or f.name in exclude:
            continue
        meta = f.metadata
        presets = ", ".join(f"{name}: {_shown(getattr(preset, f.name), meta)}" for name, preset in PRESETS.items())
        text = (helps or {}).get(f.name, meta["help"])
        options = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{text} (presets: {presets})"}
        if field_type(f.name) is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif "choices" in meta:
            options["choices"] = meta["choices"]
        else:
            options["type"] = _value_of(f.name)
            options["metavar"] = meta.get("metavar", field_type(f.name).__name__.upper().replace("STR", "TEXT"))
        parser.add_argument(flag_of(f.name), required=f.name in _REQUIRED, **options)
        for alias in FLAG_ALIASES.get(f.name, ()):
            parser.add_argument(alias, **{**options, "help": argparse.SUPPRESS})


def _folds(text: str) -> tuple[int, ...]:
    """An argparse ``type`` for ``covidseg cv --folds`` (:func:`covidseg.cross_validation.parse_folds`)."""
    from .cross_validation import parse_folds

    try:
        return parse_folds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shown(value, meta) -> str:
    return meta.get("none", "none") if value is None else str(value)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``covidseg`` command and its subcommands.

    It imports nothing heavy: ``covidseg --help`` and ``covidseg COMMAND --help`` answer at once.
    """
    parser = _Parser(
        prog="covidseg",
        description="COVID-19 lung-lesion segmentation on chest CT (MosMedData), reproducibly.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    device_help = TrainConfig.__dataclass_fields__["device"].metadata["help"]

    phantom = commands.add_parser("phantom", help="write the synthetic chest-CT phantom in MosMedData's layout")
    phantom.add_argument("out", type=Path, help="output folder")
    phantom.add_argument("--size", type=_value_of("image_size"), default=512, help="in-plane size in pixels (default 512)")
    phantom.add_argument("--seed", type=_value_of("seed"), default=0, help="random seed (default 0)")

    download = commands.add_parser("download", help="download and verify the 50 annotated MosMedData studies")
    download.add_argument("out", type=Path, help="output folder")
    download.add_argument("--mirror", default=None, help="base URL of the mirror (default: the pinned GitHub mirror)")
    download.add_argument("--categories", default=None, metavar="CT-0,CT-1,...|all", help="download these categories of all 1110 studies (default: the 50 annotated CT-1 studies)")
    download.add_argument("--per-category", type=_whole_number(1, 1110), default=None, metavar="N", help="with --categories: a seeded sample of N studies of each")
    download.add_argument("--seed", type=_value_of("seed"), default=0, help="seed of the --per-category sample (default 0)")

    train = commands.add_parser("train", help="train a model with early stopping")
    train.add_argument("--data", type=Path, default=None, help="MosMedData folder (default: $COVIDSEG_DATA or the phantom)")
    train.add_argument("--out", type=Path, required=True, help="run folder for checkpoints and history (new or empty, unless --resume)")
    train.add_argument("--preset", choices=sorted(PRESETS), default="thesis", help="the settings flags not given take (default: thesis)")
    _add_config_flags(train)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed epoch")
    train.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")

    evaluate = commands.add_parser("evaluate", help="score a trained run on a part of its split")
    evaluate.add_argument("--data", type=Path, default=None)
    evaluate.add_argument("--run", type=Path, required=True)
    evaluate.add_argument("--part", choices=PARTS, default="test")
    evaluate.add_argument("--json", type=Path, default=None,
                          help="also write the scores and run card as JSON (a new file, or a report this command wrote)")
    evaluate.add_argument("--device", type=_value_of("device"), default="auto", help=device_help)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")

    predict = commands.add_parser("predict", help="segment a CT study (NIfTI, HU) and write its lesion mask")
    predict.add_argument("--run", type=Path, required=True)
    predict.add_argument("input", type=Path, metavar="IN.nii.gz")
    predict.add_argument("output", type=Path, metavar="OUT.nii.gz")
    predict.add_argument("--device", type=_value_of("device"), default="auto", help=device_help)
    predict.add_argument("--batch-size", type=_value_of("batch_size"), default=8, help="slices per forward pass (default 8)")
    predict.add_argument("--lungs-box", action="store_true",
                         help="predict only inside the box around the lungs: faster, but not the same mask (see benchmarks/README.md)")
    predict.add_argument("--lungs", choices=LUNG_METHOD_NAMES, default="classical", help="lung method for the involvement (default classical)")
    predict.add_argument("--lungs-out", type=Path, default=None, metavar="LUNGS.nii.gz", help="also write the lung mask (1 right, 2 left)")
    predict.add_argument("--json", type=Path, default=None, help="also write volumes, involvement and category as JSON")

    screen = commands.add_parser("screen", help="lungs, lesions, involvement and category of every study of a folder, into a CSV")
    screen.add_argument("data", type=Path, metavar="DATA", help="MosMedData folder or folder of NIfTI studies")
    screen.add_argument("--run", "--model-run", dest="run", type=Path, required=True,
                        help="the training run (under torchrun, whose own --run-path takes --run, write --model-run)")
    screen.add_argument("--out", type=Path, required=True, metavar="OUT.csv", help="the CSV; a rerun screens only the studies missing from it")
    screen.add_argument("--lungs", choices=LUNG_METHOD_NAMES, default="classical", help="lung method (default classical)")
    screen.add_argument("--device", type=_value_of("device"), default="auto", help=device_help)
    screen.add_argument("--batch-size", type=_value_of("batch_size"), default=8, help="slices per forward pass (default 8)")
    screen.add_argument("--quiet", action="store_true", help="no progress bar")

    cv = commands.add_parser("cv", help="cross-validate a model on MiniSeg's five folds, scored out of fold beside MiniSeg's scores")
    cv.add_argument("--data", type=Path, default=None, help="MosMedData folder (default: $COVIDSEG_DATA or the phantom)")
    cv.add_argument("--out", type=Path, required=True,
                    help="folder of the fold runs (OUT/fold-K) and the report; the same command resumes it after an interruption")
    cv.add_argument("--folds", type=_folds, default=None, metavar="K-L|K,L,...", help="MiniSeg's folds to run (default: 1-5)")
    cv.add_argument("--preset", choices=sorted(PRESETS), default="thesis", help="the settings flags not given take (default: thesis)")
    _add_config_flags(cv, exclude=("split",), helps={"time_budget": CV_TIME_BUDGET_HELP})
    cv.add_argument("--json", type=Path, default=None,
                    help="the JSON report (default OUT/cross-validation.json; a new file, or a report this command wrote)")
    cv.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of ``covidseg train``: the preset, then the flags given.

    Raises:
        ValueError: If the values do not fit together (e.g. an image size the model cannot take),
            naming the flag.
    """
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in _NOT_FLAGS]
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    try:
        return get_preset(args.preset).replace(**given)
    except ConfigError as exc:
        raise ValueError(exc.describe(flag_of(exc.name))) from None


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
    stop = "time budget" if result.stopped_by_budget else "early stopping" if result.stopped_early else "epoch limit"
    print(f"best validation per-study Dice {result.best_val_dice:.4f} at epoch {result.best_epoch + 1} ({stop})")
    print(result.card)
    if result.stopped_by_budget:
        print(f"stopped for the time budget after epoch {result.history[-1]['epoch'] + 1}, which {args.out / 'last.pt'} holds; "
              f"continue with: {shlex.join(_resume_command(args.argv))}")


def _resume_command(argv: list[str]) -> list[str]:
    """The ``covidseg`` command line that continues the run ``argv`` trains."""
    return ["covidseg", *argv] + ([] if "--resume" in argv else ["--resume"])


def _evaluate(args) -> None:
    from .evaluation import evaluate_run, format_report

    report = evaluate_run(args.run, args.data, args.part, args.device, args.json, progress=not args.quiet)
    print(format_report(report))


def _predict(args) -> None:
    from .nifti import check_new_output, load_volume
    from .prediction import predict_file

    # Cheap checks first, so a bad path fails before the model is loaded.
    if not args.run.is_dir():
        raise CheckpointError(args.run, "run folder not found (train one with 'covidseg train')")
    if args.output.exists() and args.input.exists() and args.output.samefile(args.input):
        raise DataError(args.output, "is the input study; writing the mask there would destroy it")
    check_new_output(args.output)  # nor over any other file it did not write
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


def _cv(args) -> None:
    from .cross_validation import FOLDS, TimeBudgetSpent, cross_validate, format_report

    config = config_from_args(args)
    try:
        report = cross_validate(config, args.out, args.folds or FOLDS, args.data, args.json, progress=not args.quiet)
    except TimeBudgetSpent as exc:
        print(f"{exc}; continue with: {shlex.join(['covidseg', *args.argv])}")
        return
    print(format_report(report))


def _interrupted(args, argv: list[str], exc: KeyboardInterrupt) -> str:
    """The message printed on Ctrl-C: what is saved, and the command that continues."""
    from .training import TrainingInterrupted

    if args.command in ("evaluate", "predict"):
        return "covidseg: interrupted; no output was written"
    if args.command == "screen":
        return f"covidseg: interrupted; the studies done are kept: {shlex.join(['covidseg', *argv])} finishes the rest"
    if args.command == "cv":
        what = exc if isinstance(exc, TrainingInterrupted) else "interrupted"
        return f"covidseg: {what}; finished folds are kept, and {shlex.join(['covidseg', *argv])} continues the rest"
    if args.command != "train" or not isinstance(exc, TrainingInterrupted):
        return "covidseg: interrupted"
    if exc.saved_epoch is None:
        return f"covidseg: {exc}; start again with: {shlex.join(['covidseg', *argv])}"
    return f"covidseg: {exc}: {shlex.join(_resume_command(argv))}"


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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed on one line
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else EXIT_ERROR
    args.argv = argv  # the command as typed, for the messages that repeat it
    handler = {"phantom": _phantom, "download": _download, "train": _train, "evaluate": _evaluate, "predict": _predict, "screen": _screen, "cv": _cv}[args.command]
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
        print(f"covidseg: error: {_out_of_memory(parser, args.command, 'CPU')}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback
        kind = _out_of_memory_kind(exc)
        if kind:
            print(f"covidseg: error: {_out_of_memory(parser, args.command, kind)}", file=sys.stderr)
            return EXIT_ERROR
        print(_unexpected(exc), file=sys.stderr)
        return EXIT_BUG
    return 0


def _out_of_memory(parser: argparse.ArgumentParser, command: str, kind: str) -> str:
    """What to say when ``command`` ran out of ``kind`` ('GPU' or 'CPU') memory: only the flags
    that command has."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = {option for action in sub._actions for option in action.option_strings}
    smaller = [flag for flag in ("--batch-size", "--image-size") if flag in flags]
    tips = [f"a smaller {' or '.join(smaller)}"] if smaller else []
    if kind == "GPU" and "--device" in flags:
        tips.append("--device cpu")
    advice = f"; try {', or '.join(tips)}" if tips else "; close other programs or use a machine with more memory"
    resume = "; a run that completed an epoch continues with --resume" if command == "train" else ""
    return f"out of {kind} memory{advice}{resume}"


def _out_of_memory_kind(exc: BaseException) -> str | None:
    """'GPU' or 'CPU' if ``exc`` is torch running out of memory, else ``None`` (torch is not
    imported for this: an error raised before it was loaded is not torch's)."""
    torch = sys.modules.get("torch")
    text = str(exc).lower()
    if torch is not None and isinstance(exc, torch.OutOfMemoryError) or "cuda out of memory" in text or "mps backend out of memory" in text:
        return "GPU"
    if "can't allocate memory" in text or "out of memory" in text:
        return "CPU"
    return None


if __name__ == "__main__":
    sys.exit(main())
