"""The training loop: Adam, Dice loss, early stopping on validation per-study Dice.

One readable loop in labelled phases (data, model, resume, epochs). Each epoch trains on the
training slices in a seeded order, scores the validation *studies* (per-study Dice, the metric
the thesis reports), keeps the best checkpoint, and writes ``last.pt`` for ``--resume``. A run
killed at any point resumes from its last completed epoch and, on the CPU, continues exactly as
an uninterrupted run would.

Run folder::

    RUN/config.json   the TrainConfig
    RUN/last.pt       state after the last completed epoch (model, optimiser, early stopping, history)
    RUN/best.pt       the model of the best validation epoch
    RUN/history.csv   one row per epoch: loss, validation Dice, epoch time, learning rate
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .dataset import SliceDataset
from .devices import describe_device, resolve_device
from .errors import CheckpointError, DataError
from .losses import build_loss
from .metrics import study_scores
from .models import build_model
from .mosmed import annotated_studies
from .prediction import THRESHOLD, predict_probabilities
from .sources import RunCard, data_source, resolve_data_dir
from .splits import get_split

__all__ = ["EarlyStopping", "FitResult", "fit", "validation_dice"]

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
        CheckpointError: If ``resume`` finds a checkpoint of another model or config.
        DataError: For unusable data.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    use_amp = config.amp and device.type == "cuda"

    # --- data: split by study first, then slice ------------------------------------------------
    data_dir = resolve_data_dir(data_dir, phantom_size=config.image_size, progress=progress)
    split = get_split(config.split)
    train_set = SliceDataset(annotated_studies(data_dir, split.train), config.image_size, cache_dir, progress)
    val_set = SliceDataset(annotated_studies(data_dir, split.val), config.image_size, cache_dir, progress)

    # --- model, optimiser, loss -----------------------------------------------------------------
    last_path = run_dir / "last.pt"
    resuming = resume and last_path.is_file()
    torch.manual_seed(config.seed)
    weights = None if resuming else config.encoder_weights  # a resumed run takes its weights from last.pt
    model = build_model(config.model, encoder_weights=weights, width=config.unet_width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = build_loss(config.loss)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    stopper = EarlyStopping(config.patience, config.min_delta)
    history: list[dict] = []
    start_epoch = 0

    # --- resume -------------------------------------------------------------------------------
    if resuming:
        state = load_checkpoint(last_path, model_name=config.model, config=config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stopper.load_state_dict(state["early_stopping"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        if progress:
            print(f"resuming {run_dir} after epoch {start_epoch - 1} (best val Dice {stopper.best_score:.4f})")
    elif not resume and last_path.is_file():
        raise CheckpointError(last_path, "run folder already holds a run; pass --resume to continue it or choose another --out")
    _write_json(run_dir / "config.json", config.to_dict())

    # --- epochs -------------------------------------------------------------------------------
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.max_epochs):
        if stopper.should_stop:
            break
        tic = time.perf_counter()
        order = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)  # depends on the epoch only
        loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=order, pin_memory=device.type == "cuda")
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
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_dice": val_dice,
            "epoch_seconds": time.perf_counter() - tic,
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(row)
        if stopper.update(val_dice, epoch):
            save_checkpoint(_state(config, model, optimizer, stopper, history, epoch, include_optimizer=False), run_dir / "best.pt")
        save_checkpoint(_state(config, model, optimizer, stopper, history, epoch), last_path)
        _write_history(run_dir, history)
        if progress:
            mark = " *" if stopper.best_epoch == epoch else ""
            print(f"epoch {epoch + 1:3d}  loss {row['train_loss']:.4f}  val Dice {val_dice:.4f}  {row['epoch_seconds']:.1f} s{mark}")

    card = RunCard(
        data=data_source(data_dir),
        model=config.model,
        device=describe_device(device),
        epochs=len(history),
        image_size=config.image_size,
        seconds=time.perf_counter() - started,
        preset=config.preset,
    )
    return FitResult(run_dir, history, stopper.best_epoch, stopper.best_score, stopper.should_stop, card)


def _state(config, model, optimizer, stopper, history, epoch, include_optimizer=True) -> dict:
    state = {
        "model_name": config.model,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "epoch": epoch,
        "early_stopping": stopper.state_dict(),
        "history": [dict(row) for row in history],
    }
    if include_optimizer:
        state["optimizer"] = optimizer.state_dict()
    return state


def _write_history(run_dir: Path, history: list[dict]) -> None:
    tmp = run_dir / ".history.csv.tmp"
    try:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(history)
        os.replace(tmp, run_dir / "history.csv")
    except OSError as exc:
        raise DataError(run_dir / "history.csv", f"could not be written ({exc.strerror or exc})") from None
    _write_json(run_dir / "history.json", history)


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(value, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(path, f"could not be written ({exc.strerror or exc})") from None
