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
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
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
from .errors import CheckpointError, DataError
from .losses import build_loss
from .metrics import study_scores
from .models import build_model
from .mosmed import annotated_studies
from .prediction import THRESHOLD, predict_probabilities
from .sources import RunCard, resolve_data_dir
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
        CheckpointError: If ``run_dir`` already holds a run and ``resume`` is false, or if
            ``resume`` finds a damaged checkpoint or one of another model or config. This is
            checked before any data is read.
        DataError: For unusable data, or a run folder that cannot be written.
        TrainingInterrupted: On Ctrl-C; ``last.pt`` then holds the last completed epoch, intact,
            and nothing of the interrupted epoch is written.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    use_amp = config.amp and device.type == "cuda"

    # --- run folder: check what is there before any slow work ---------------------------------
    last_path = run_dir / "last.pt"
    if run_dir.exists() and not run_dir.is_dir():
        raise DataError(run_dir, "is a file; the run folder must be a folder")
    resumed = None
    if last_path.is_file():
        if not resume:
            raise CheckpointError(last_path, "run folder already holds a run; pass --resume to continue it or choose another --out")
        resumed = load_checkpoint(last_path, model_name=config.model, config=config)
        lacking = [key for key in ("optimizer", "early_stopping") if key not in resumed]
        if lacking:
            raise CheckpointError(last_path, f"cannot resume from it: it lacks {', '.join(lacking)} (is it a copy of best.pt?)")
    elif resume:
        print(f"nothing to resume in {run_dir} (no last.pt); starting a new run")

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
            _repair_best(run_dir / "best.pt", resumed)
            history = [dict(row) for row in resumed["history"]]
            start_epoch = saved_epoch + 1
            print(f"resuming {run_dir} after epoch {start_epoch} (best val Dice {stopper.best_score:.4f})")

        # --- data: split by study first, then slice --------------------------------------------
        data_dir = resolve_data_dir(data_dir, phantom_size=config.image_size, progress=progress)
        split = get_split(config.split)
        train_set = SliceDataset(annotated_studies(data_dir, split.train), config.image_size, cache_dir, progress)
        val_set = SliceDataset(annotated_studies(data_dir, split.val), config.image_size, cache_dir, progress)
        _remove_stale_temporaries(run_dir)
        _write_json(run_dir / "config.json", config.to_dict())

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
            for images, masks in bar:
                images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda") if use_amp else contextlib.nullcontext():
                    loss = loss_fn(model(images), masks)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
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
                state = _state(config, model, optimizer, scaler, stopper, history, epoch)
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


_TEMPORARY_PATTERNS = (".last.pt.*.tmp", ".best.pt.*.tmp", ".history.csv.tmp", ".history.json.tmp", ".config.json.tmp")
"""Temporary files this module and :mod:`covidseg.checkpoint` write before renaming them."""


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temporary files left by a run that was killed while writing (SIGKILL, power loss)."""
    for pattern in _TEMPORARY_PATTERNS:
        for stale in run_dir.glob(pattern):
            with contextlib.suppress(OSError):
                stale.unlink()


def _state(config, model, optimizer, scaler, stopper, history, epoch) -> dict:
    """Everything ``last.pt`` holds: model, optimiser (and AMP scaler), epoch, early stopping,
    history, config."""
    return {
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
    _write_text(run_dir / "history.csv", buffer.getvalue())
    _write_json(run_dir / "history.json", history)


def _write_json(path: Path, value) -> None:
    _write_text(path, json.dumps(value, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write a small text file through ``.NAME.tmp`` and a rename; on failure the old file stays."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise DataError(path, f"could not be written ({exc.strerror or exc}); the previous file is kept") from None
