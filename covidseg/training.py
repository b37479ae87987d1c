"""The training loop: Adam, Dice loss, early stopping on validation per-study Dice.

One readable loop in labelled phases (run folder, model and resume, data, epochs). Each epoch
trains on the training slices in a seeded order, scores the validation *studies* (per-study Dice,
the metric the thesis reports), keeps the best checkpoint, and writes ``last.pt`` for
``--resume``. Checkpoints are written atomically, so a run killed at any point (SIGKILL, a Colab
session ending) resumes from its last completed epoch and, on the CPU, continues exactly as an
uninterrupted run would. Ctrl-C never leaves half an epoch on disk: it raises
:class:`TrainingInterrupted`, which says which epoch ``last.pt`` holds.

Run folder::

    RUN/config.json   the TrainConfig
    RUN/last.pt       state after the last completed epoch (model, optimiser, early stopping, history)
    RUN/best.pt       the model of the best validation epoch (written after last.pt, from which a
                      resumed run rebuilds it if a kill fell in between)
    RUN/history.csv   one row per epoch: loss, validation Dice, epoch time, learning rate
    RUN/history.json  the same rows as JSON

A new run needs a new or empty folder and ``--resume`` a folder holding a resumable run
(:mod:`covidseg.runs`); one process at a time writes a run folder. Each checkpoint records the
identity of the data the run was trained on (:func:`covidseg.sources.data_identity`): a run is
never resumed on other data. Training stops at the first non-finite loss or weights
(:class:`~covidseg.errors.TrainingDiverged`), and nothing of that epoch is written.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .dataset import SliceDataset
from .devices import resolve_device
from .errors import CheckpointError, DataError, RunFolderError, RunMismatchError, TrainingDiverged
from .files import write_json, write_text
from .losses import build_loss
from .metrics import THRESHOLD, study_scores
from .models import build_model
from .mosmed import annotated_studies
from .prediction import predict_probabilities
from .run_card import RunCard
from .runs import describe_contents, folder_contents, is_run_file, run_lock
from .sources import data_identity, resolve_data_dir
from .splits import get_split

__all__ = ["EarlyStopping", "FitResult", "TrainingInterrupted", "fit", "validation_dice"]

HISTORY_FIELDS = ("epoch", "train_loss", "val_dice", "epoch_seconds", "lr")


@dataclass
class EarlyStopping:
    """Stop when the validation score has not improved by ``min_delta`` for ``patience`` epochs.

    Attributes:
        patience: Epochs without improvement tolerated.
        min_delta: Smallest gain that counts as an improvement.
        best_score: Best score so far (``-inf`` before the first epoch).
        best_epoch: Epoch of the best score (``-1`` before the first epoch).
        bad_epochs: Epochs since the last improvement.
    """

    patience: int
    min_delta: float = 0.0
    best_score: float = float("-inf")
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Record an epoch's score; return ``True`` if it is a new best."""
        if score > self.best_score + self.min_delta:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_epoch, self.bad_epochs = state["best_score"], state["best_epoch"], state["bad_epochs"]


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        run_dir: The run folder.
        history: One dict per epoch (see ``HISTORY_FIELDS``).
        best_epoch: Epoch (0-based) of the best validation Dice.
        best_val_dice: That Dice.
        stopped_early: Whether early stopping ended the run.
        card: The run card.
    """

    run_dir: Path
    history: list[dict]
    best_epoch: int
    best_val_dice: float
    stopped_early: bool
    card: RunCard


def validation_dice(model: torch.nn.Module, dataset: SliceDataset, batch_size: int, device: torch.device, amp: bool) -> float:
    """Mean per-study Dice over the studies of ``dataset`` (each study scored in 3D)."""
    scores = []
    for entry in dataset.studies:
        probabilities = predict_probabilities(model, entry.images, batch_size, device, amp)
        scores.append(study_scores(probabilities >= THRESHOLD, entry.masks)["dice"])
    return float(np.mean(scores))


def fit(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> FitResult:
    """Train ``config.model`` on the training part of ``config.split``.

    Args:
        config: The run's configuration.
        run_dir: Folder for checkpoints and history (created).
        data_dir: A MosMedData folder; default: ``COVIDSEG_DATA`` or the cached phantom.
        resume: Continue from ``run_dir/last.pt`` (its config must match ``config``, except
            ``max_epochs``).
        progress: Show tqdm progress bars.
        cache_dir: Optional on-disk cache of preprocessed slices.

    Returns:
        A :class:`FitResult`.

    Raises:
        RunFolderError: If another process writes ``run_dir``; if ``resume`` is false and
            ``run_dir`` holds anything (a run's files, or the user's); if ``resume`` is true and
            ``run_dir`` holds files but no ``last.pt``. Checked before any data is read, and
            nothing in the folder is changed.
        CheckpointError: If ``resume`` finds a damaged checkpoint or one that cannot be resumed;
            :class:`~covidseg.errors.RunMismatchError` if it is of another model or config, or was
            trained on other data.
        TrainingDiverged: At the first non-finite loss or weights; ``last.pt`` keeps the last
            good epoch.
        DataError: For unusable data, or a run folder that cannot be written.
        TrainingInterrupted: On Ctrl-C; ``last.pt`` then holds the last completed epoch, intact,
            and nothing of the interrupted epoch is written.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise DataError(run_dir, "is a file; the run folder must be a folder")
    device = resolve_device(config.device)
    with run_lock(run_dir):
        return _fit(config, run_dir, device, data_dir, resume, progress, cache_dir, started)


def _check_run_folder(run_dir: Path, config: TrainConfig, resume: bool) -> dict | None:
    """Check what the run folder holds before any slow work; return the state to resume, if any.

    Raises:
        RunFolderError: A new run into a folder that holds anything, or ``resume`` with a folder
            that holds files but no ``last.pt``.
        CheckpointError: A damaged ``last.pt``, or one that cannot be resumed.
        RunMismatchError: A ``last.pt`` of another model or config.
    """
    contents = folder_contents(run_dir)
    last_path = run_dir / "last.pt"
    if not resume:
        if last_path.is_file():
            raise RunFolderError(last_path, "run folder already holds a run; pass --resume to continue it or choose another --out")
        if any(is_run_file(name) for name in contents):
            raise RunFolderError(run_dir, f"already holds a run; pass --resume to continue it or choose another --out ({describe_contents(contents)})")
        if contents:
            raise RunFolderError(run_dir, f"is not empty ({describe_contents(contents)}); a new run needs a new or empty folder: choose another --out")
        return None
    if not contents:
        print(f"nothing to resume in {run_dir} (no last.pt); starting a new run")
        return None
    if not last_path.is_file():
        raise RunFolderError(run_dir, f"cannot be resumed: it has no last.pt ({describe_contents(contents)}); choose another --out for a new run")
    saved_config = run_dir / "config.json"
    if saved_config.is_file():
        try:
            TrainConfig.from_dict(json.loads(saved_config.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
            raise RunFolderError(saved_config, f"is not the config of a covidseg run ({' '.join(str(exc).split())[:120]}); it is left as it is: choose another --out") from None
    resumed = load_checkpoint(last_path, model_name=config.model, config=config)
    lacking = [key for key in ("optimizer", "early_stopping") if key not in resumed]
    if lacking:
        raise CheckpointError(last_path, f"cannot resume from it: it lacks {', '.join(lacking)} (is it a copy of best.pt?)")
    return resumed


def _fit(config, run_dir, device, data_dir, resume, progress, cache_dir, started) -> FitResult:
    """:func:`fit`, with the run folder locked."""
    use_amp = config.amp and device.type == "cuda"
    last_path = run_dir / "last.pt"
    resumed = _check_run_folder(run_dir, config, resume)

    saved_epoch = None if resumed is None else int(resumed["epoch"])  # the epoch last.pt holds
    epoch = None  # the epoch being trained
    try:
        # --- model, optimiser, loss (a resumed run takes its weights from last.pt) -------------
        torch.manual_seed(config.seed)
        weights = None if resumed is not None else config.encoder_weights
        model = build_model(config.model, encoder_weights=weights, width=config.unet_width).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        loss_fn = build_loss(config.loss)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        stopper = EarlyStopping(config.patience, config.min_delta)
        history: list[dict] = []
        start_epoch = 0
        if resumed is not None:
            _restore(last_path, resumed, model, optimizer, scaler, stopper)
            history = [dict(row) for row in resumed["history"]]
            start_epoch = saved_epoch + 1
            print(f"resuming {run_dir} after epoch {start_epoch} (best val Dice {stopper.best_score:.4f})")

        # --- data: split by study first, then slice; the run's data must be the resumed run's ---
        data_dir = resolve_data_dir(data_dir, phantom_size=config.image_size, progress=progress)
        split = get_split(config.split)
        train_studies, val_studies = annotated_studies(data_dir, split.train), annotated_studies(data_dir, split.val)
        identity = data_identity(train_studies + val_studies)
        if resumed is not None and resumed.get("data", identity) != identity:
            raise RunMismatchError(last_path, f"was trained on other data than {data_dir} (data identity {resumed['data']}, "
                                              f"not {identity}); resume it with the --data it was trained on, or choose another --out")
        if resumed is not None:
            _repair_best(run_dir / "best.pt", resumed)

        train_set = SliceDataset(train_studies, config.image_size, cache_dir, progress)
        val_set = SliceDataset(val_studies, config.image_size, cache_dir, progress)
        config_written = False

        # --- epochs -------------------------------------------------------------------------
        for epoch in range(start_epoch, config.max_epochs):
            if stopper.should_stop:
                break
            tic = time.perf_counter()
            order = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)  # depends on the epoch only
            sampler = RandomSampler(train_set, num_samples=config.slices_per_epoch, generator=order)  # all slices unless capped
            loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, pin_memory=device.type == "cuda")
            model.train()
            losses = []
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.max_epochs}", disable=not progress, leave=False)
            for step, (images, masks) in enumerate(bar):
                images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda") if use_amp else contextlib.nullcontext():
                    loss = loss_fn(model(images), masks)
                losses.append(loss.item())
                if not math.isfinite(losses[-1]):
                    raise _diverged(run_dir, config, saved_epoch, epoch, f"the loss became {losses[-1]} at step {step + 1}")
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            broken = _first_non_finite(model)
            if broken:
                raise _diverged(run_dir, config, saved_epoch, epoch, f"weight {broken} became non-finite")
            val_dice = validation_dice(model, val_set, config.batch_size, device, use_amp)

            # --- bookkeeping: a Ctrl-C here waits until last.pt holds this complete epoch ------
            with _interrupts_deferred():
                row = {
                    "epoch": epoch,
                    "train_loss": float(np.mean(losses)),
                    "val_dice": val_dice,
                    "epoch_seconds": time.perf_counter() - tic,
                    "lr": optimizer.param_groups[0]["lr"],
                }
                history.append(row)
                improved = stopper.update(val_dice, epoch)
                state = _state(config, model, optimizer, scaler, stopper, history, epoch, identity)
                if not config_written:  # with the first checkpoint: a run that saved nothing leaves nothing
                    write_json(run_dir / "config.json", config.to_dict())
                    config_written = True
                save_checkpoint(state, last_path)  # first: a resume can always rebuild best.pt from it
                saved_epoch = epoch
                if improved:
                    save_checkpoint(_without_optimizer(state), run_dir / "best.pt")
                _write_history(run_dir, history)
            if progress:
                mark = " *" if stopper.best_epoch == epoch else ""
                print(f"epoch {epoch + 1:3d}  loss {row['train_loss']:.4f}  val Dice {val_dice:.4f}  {row['epoch_seconds']:.1f} s{mark}")
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        # Nothing of the interrupted epoch is written: last.pt stays the last *completed* epoch,
        # so a resumed run continues exactly as an uninterrupted one.
        raise TrainingInterrupted(run_dir, saved_epoch, epoch) from None

    card = RunCard.describe(config, data_dir, device, len(history), time.perf_counter() - started)
    return FitResult(run_dir, history, stopper.best_epoch, stopper.best_score, stopper.should_stop, card)


def _first_non_finite(model: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer of ``model`` holding a NaN or infinity."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _diverged(run_dir: Path, config: TrainConfig, saved_epoch: int | None, epoch: int, what: str) -> TrainingDiverged:
    kept = "no epoch was saved" if saved_epoch is None else f"{run_dir / 'last.pt'} keeps epoch {saved_epoch + 1}, the last good one"
    return TrainingDiverged(run_dir, f"training diverged: {what} in epoch {epoch + 1}; nothing of that epoch was saved and {kept} "
                                     f"(try a smaller --lr than {config.lr:g})")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (``KeyboardInterrupt``) during :func:`fit`, with what is saved.

    It is a ``KeyboardInterrupt``, so code that does not know it behaves as before.

    Attributes:
        run_dir: The run folder.
        saved_epoch: The epoch (0-based) that ``run_dir/last.pt`` holds, intact, or ``None`` if
            no epoch was completed.
        epoch: The epoch (0-based) that was being trained, or ``None`` if the interruption came
            before the first one started.
    """

    def __init__(self, run_dir: Path, saved_epoch: int | None, epoch: int | None):
        self.run_dir, self.saved_epoch, self.epoch = Path(run_dir), saved_epoch, epoch
        during = "before training started" if epoch is None else f"during epoch {epoch + 1}"
        if saved_epoch is None:
            saved = "no epoch was completed, so there is nothing to resume"
        else:
            saved = f"{run_dir / 'last.pt'} holds epoch {saved_epoch + 1}; resume to continue from there"
        super().__init__(f"training interrupted {during}; {saved}")


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold back SIGINT (Ctrl-C) while the block runs, then raise ``KeyboardInterrupt`` if one came.

    Only in the main thread, and only where Python's own SIGINT handler (or another Python
    handler) is installed; an ignored SIGINT stays ignored.
    """
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _repair_best(best_path: Path, last: dict) -> None:
    """Rewrite ``best.pt`` from ``last.pt`` if a kill fell between writing the two.

    ``last.pt`` is written first; if its own epoch is the best one, ``best.pt`` must hold that
    epoch too, or the best model would be silently lost (or an older one reported as the best).
    """
    if last["early_stopping"]["best_epoch"] != last["epoch"]:
        return
    if best_path.is_file():
        try:
            if load_checkpoint(best_path)["epoch"] == last["epoch"]:
                return
        except CheckpointError:
            pass  # damaged: rewrite it from last.pt
    state = {key: value for key, value in last.items() if key != "format"}
    state["config"] = last["config"].to_dict()
    save_checkpoint(_without_optimizer(state), best_path)


def _without_optimizer(state: dict) -> dict:
    """A checkpoint for ``best.pt``: everything but the optimiser and scaler state."""
    return {key: value for key, value in state.items() if key not in ("optimizer", "scaler")}


def _restore(path: Path, state: dict, model, optimizer, scaler, stopper: EarlyStopping) -> None:
    """Load a resume checkpoint into fresh objects, reporting a mismatch as a CheckpointError."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        stopper.load_state_dict(state["early_stopping"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"cannot resume from it: its state does not fit the model ({first})") from None


def _state(config, model, optimizer, scaler, stopper, history, epoch, data) -> dict:
    """Everything ``last.pt`` holds: model, optimiser (and AMP scaler), epoch, early stopping,
    history, config, and the identity of the data trained on."""
    return {
        "data": data,
        "model_name": config.model,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "early_stopping": stopper.state_dict(),
        "history": [dict(row) for row in history],
    }


def _write_history(run_dir: Path, history: list[dict]) -> None:
    """Write ``history.csv`` and ``history.json``, each atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(run_dir / "history.csv", buffer.getvalue())
    write_json(run_dir / "history.json", history)
