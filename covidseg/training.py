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

What a student sees (``progress=True``): one progress bar for the whole call, reset at each epoch
(a widget in Jupyter and Colab, text in a terminal; closed at the end, so an executed notebook
keeps one bar however many epochs ran); after a warm-up step and a few timed ones, an estimate of
the time per epoch and of the worst case at the epoch cap; then one line per epoch with the
training loss, the validation per-study Dice, the epoch's seconds and the best epoch so far.
``TrainConfig.time_budget`` ends a call cleanly between epochs (:attr:`FitResult.stopped_by_budget`),
to be continued with ``resume=True`` (``covidseg train ... --resume``).

On CUDA, how the loop runs is chosen by :func:`plan_training` (``TrainConfig.amp`` and
``fast_gpu``); on the CPU it is plain float32 and unchanged by either.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import multiprocessing
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

__all__ = ["EarlyStopping", "FitResult", "TrainingInterrupted", "TrainingPlan", "fit", "plan_training", "validation_dice"]

HISTORY_FIELDS = ("epoch", "train_loss", "val_dice", "epoch_seconds", "lr")

WARMUP_STEPS = 1
"""Training steps of a call's first epoch left out of the speed estimate (memory allocation,
cuDNN autotuning and kernel compilation happen there)."""

ESTIMATE_STEPS = 5
"""Steps timed, after the warm-up, for the estimate (fewer if an epoch has fewer)."""

VALIDATION_BATCH_FACTOR = 4
"""On the tuned CUDA path, validation runs in batches this many times the training batch
(inference keeps no activations for a backward pass, so they fit)."""

MAX_LOADER_WORKERS = 4
"""Most worker processes that load training batches on the tuned CUDA path."""

PREFETCH_BATCHES = 4
"""Batches each loader worker keeps ready."""

_clock = time.perf_counter
"""The time source of epoch times, the estimate and the time budget (tests replace it)."""


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
        stopped_by_budget: Whether ``config.time_budget`` ended this call before the run was
            done; ``run_dir/last.pt`` holds its last epoch, and ``fit(..., resume=True)``
            continues it.
    """

    run_dir: Path
    history: list[dict]
    best_epoch: int
    best_val_dice: float
    stopped_early: bool
    card: RunCard
    stopped_by_budget: bool = False


@dataclass(frozen=True)
class TrainingPlan:
    """How the training loop runs on a device (:func:`plan_training` chooses it).

    Attributes:
        autocast: The autocast dtype (``torch.bfloat16`` or ``torch.float16``), or ``None``
            for float32.
        grad_scaler: Scale the loss (float16 needs it: its small gradients underflow).
        channels_last: Model and batches in channels-last (NHWC) layout, the layout of the
            tensor-core convolutions.
        cudnn_benchmark: Let cuDNN time its algorithms for each shape once and keep the fastest
            (``torch.backends.cudnn.benchmark``, set for the call and restored after).
        fused_adam: Adam's update as one fused kernel (``torch.optim.Adam(fused=True)``); with
            a scaler it also skips the scaler's per-step host synchronisation.
        loader_workers: Worker processes that load training batches (0: the main process).
        pin_memory: Batches in page-locked memory, so the copy to the GPU is asynchronous.
        validation_batch: Slices per forward pass in validation.
    """

    autocast: torch.dtype | None
    grad_scaler: bool
    channels_last: bool
    cudnn_benchmark: bool
    fused_adam: bool
    loader_workers: int
    pin_memory: bool
    validation_batch: int


def plan_training(device_type: str, amp: bool, fast_gpu: bool, batch_size: int, bf16_native: bool = False, spare_cpus: int = 0) -> TrainingPlan:
    """Choose how to train on a device, from its kind and capabilities alone.

    - The CPU and MPS: float32, the model and batches as they are, no worker processes
      (``amp`` and ``fast_gpu`` change nothing there: CPU training stays bit-for-bit repeatable).
    - CUDA with ``fast_gpu`` off: float16 autocast with a gradient scaler if ``amp``, else
      float32; batches pinned; nothing else (the CUDA path before ``fast_gpu`` existed, except
      that each step's loss is now read back one step late, on every path).
    - CUDA with ``fast_gpu`` on: bfloat16 autocast where the GPU has bfloat16 tensor cores
      (compute capability 8.0 and later: A100, L4, H100) and then no scaler, else float16 with a
      scaler (the T4 of free Colab, whose bfloat16 is emulated, without tensor cores), if
      ``amp``; channels-last layout, cuDNN autotuning, fused Adam, up to
      :data:`MAX_LOADER_WORKERS` loader workers (one per spare CPU), and validation in
      :data:`VALIDATION_BATCH_FACTOR` times larger batches.

    Args:
        device_type: ``'cpu'``, ``'cuda'`` or ``'mps'``.
        amp: ``TrainConfig.amp``.
        fast_gpu: ``TrainConfig.fast_gpu``.
        batch_size: The training batch size.
        bf16_native: Whether the GPU computes in bfloat16 natively
            (``torch.cuda.is_bf16_supported(including_emulation=False)``).
        spare_cpus: CPUs free for loader workers (0 where processes cannot be forked).

    Returns:
        A :class:`TrainingPlan`.
    """
    cuda = device_type == "cuda"
    fast = cuda and fast_gpu
    dtype = None
    if cuda and amp:
        dtype = torch.bfloat16 if fast and bf16_native else torch.float16
    return TrainingPlan(
        autocast=dtype,
        grad_scaler=dtype == torch.float16,
        channels_last=fast,
        cudnn_benchmark=fast,
        fused_adam=fast,
        loader_workers=max(0, min(MAX_LOADER_WORKERS, spare_cpus)) if fast else 0,
        pin_memory=cuda,
        validation_batch=batch_size * VALIDATION_BATCH_FACTOR if fast else batch_size,
    )


def _device_plan(config: TrainConfig, device: torch.device) -> TrainingPlan:
    """:func:`plan_training` for ``config`` on ``device``, with the device's capabilities."""
    bf16_native = False
    if device.type == "cuda":
        with torch.cuda.device(device):
            bf16_native = torch.cuda.is_bf16_supported(including_emulation=False)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    spare = cpus - 1 if "fork" in multiprocessing.get_all_start_methods() else 0  # no pickling of the slices per epoch
    return plan_training(device.type, config.amp, config.fast_gpu, config.batch_size, bf16_native, spare)


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
        config: The run's configuration; ``config.time_budget`` (minutes) ends the call between
            epochs (:class:`~covidseg.config.TrainConfig` states the rule).
        run_dir: Folder for checkpoints and history (created).
        data_dir: A MosMedData folder; default: ``COVIDSEG_DATA`` or the cached phantom.
        resume: Continue from ``run_dir/last.pt`` (its config must match ``config``, except in
            :data:`~covidseg.config.RESUMABLE_CHANGES`: ``max_epochs``, ``device``,
            ``fast_gpu``, ``time_budget``).
        progress: Show one progress bar, the time estimate and a line per epoch (see the
            module's docstring).
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

    Example::

        Two epochs of a tiny U-Net on the synthetic phantom (not patient data) at 32 px, in
        seconds on a CPU:

        >>> import tempfile
        >>> from pathlib import Path
        >>> from covidseg.config import get_preset
        >>> from covidseg.phantom import ensure_phantom
        >>> from covidseg.training import fit
        >>> config = get_preset("quick").replace(model="unet", image_size=32, unet_width=4, max_epochs=2,
        ...                                      slices_per_epoch=32, device="cpu")
        >>> phantom = ensure_phantom(32, progress=False)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     result = fit(config, Path(tmp) / "run", data_dir=phantom, progress=False)
        ...     files = sorted(path.name for path in (Path(tmp) / "run").glob("[!.]*"))
        >>> [row["epoch"] for row in result.history], files
        ([0, 1], ['best.pt', 'config.json', 'history.csv', 'history.json', 'last.pt'])
        >>> 0.0 <= result.best_val_dice <= 1.0, result.stopped_by_budget
        (True, False)

        The thesis protocol on a GPU (hours), in sessions of at most 55 minutes: the same call in
        each new session continues the run (``resume=True`` starts it where there is nothing to
        resume), until ``stopped_by_budget`` is false:

        >>> config = get_preset("thesis").replace(model="unet-resnet34", time_budget=55)
        >>> result = fit(config, "runs/unet-resnet34", resume=True)  # doctest: +SKIP
        nothing to resume in runs/unet-resnet34 (no last.pt); starting a new run
        estimate: 41 s per epoch (36 s of 179 training steps, 5 s of validation); at most 1.1 h for 100 epochs (early stopping usually ends sooner); the time budget of 55 min stops it after about 79 epochs
        epoch   1/100  train loss 0.8012  val Dice 0.3157  44.9 s  best 0.3157 (epoch 1)
        ...
        >>> result.stopped_by_budget  # doctest: +SKIP
        False
    """
    started = _clock()
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
    last_path = run_dir / "last.pt"
    resumed = _check_run_folder(run_dir, config, resume)
    plan = _device_plan(config, device)

    saved_epoch = None if resumed is None else int(resumed["epoch"])  # the epoch last.pt holds
    epoch = None  # the epoch being trained
    budget_note = None  # why the time budget ended the call, if it did
    try:
        # --- model, optimiser, loss (a resumed run takes its weights from last.pt) -------------
        torch.manual_seed(config.seed)
        weights = None if resumed is not None else config.encoder_weights
        model = build_model(config.model, encoder_weights=weights, width=config.unet_width).to(device)
        if plan.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, **({"fused": True} if plan.fused_adam else {}))
        loss_fn = build_loss(config.loss)
        scaler = torch.amp.GradScaler(device.type, enabled=plan.grad_scaler)
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

        def diverged(what: str) -> TrainingDiverged:
            return _diverged(run_dir, config, saved_epoch, epoch, what)

        # --- epochs: one bar for the call, reset at each epoch -----------------------------------
        steps = len(_train_loader(train_set, config, plan, start_epoch))  # the same in every epoch
        with _cudnn_benchmark(plan.cudnn_benchmark), tqdm(total=steps, disable=not progress, leave=False, unit="step") as bar:
            log, timer = _Log(bar), None
            for epoch in range(start_epoch, config.max_epochs):
                if stopper.should_stop:
                    break
                tic = _clock()
                loader = _train_loader(train_set, config, plan, epoch)
                bar.reset(total=steps)
                bar.set_description(f"epoch {epoch + 1}/{config.max_epochs}")
                if progress and epoch == start_epoch:  # the call's first epoch: estimate the time it takes

                    def report(step_seconds: float) -> None:
                        validation = _validation_seconds(model, val_set, plan, device)
                        epochs_left = config.max_epochs - start_epoch
                        log.write(_estimate(step_seconds, steps, validation, epochs_left, config.time_budget, tic - started))

                    timer = _StepTimer(device, steps, report)
                model.train()
                losses = _train_epoch(model, optimizer, scaler, loss_fn, loader, plan, device, bar, timer, diverged)
                timer = None
                broken = _first_non_finite(model)
                if broken:
                    raise diverged(f"weight {broken} became non-finite")
                with _autocast(device, plan):  # validation in the training's precision
                    val_dice = validation_dice(model, val_set, plan.validation_batch, device, amp=False)

                # --- bookkeeping: a Ctrl-C here waits until last.pt holds this complete epoch --
                with _interrupts_deferred():
                    row = {
                        "epoch": epoch,
                        "train_loss": float(np.mean(losses)),
                        "val_dice": val_dice,
                        "epoch_seconds": _clock() - tic,
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
                    log.write(_epoch_line(row, config.max_epochs, stopper))
                if epoch + 1 < config.max_epochs and not stopper.should_stop:
                    budget_note = _over_budget(config, epoch, started, tic, last_path)
                    if budget_note:
                        break
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        # Nothing of the interrupted epoch is written: last.pt stays the last *completed* epoch,
        # so a resumed run continues exactly as an uninterrupted one.
        raise TrainingInterrupted(run_dir, saved_epoch, epoch) from None

    if budget_note and progress:
        print(budget_note)
    card = RunCard.describe(config, data_dir, device, len(history), _clock() - started)
    return FitResult(run_dir, history, stopper.best_epoch, stopper.best_score, stopper.should_stop, card, budget_note is not None)


def _over_budget(config: TrainConfig, epoch: int, started: float, tic: float, last_path: Path) -> str | None:
    """Why the call stops after ``epoch`` (begun at ``tic``; the call at ``started``), or ``None``
    if another epoch as long as it would still end within ``config.time_budget``."""
    if config.time_budget is None:
        return None
    now = _clock()
    if now - started + (now - tic) <= config.time_budget * 60:
        return None
    return (f"time budget: stopped after epoch {epoch + 1} of at most {config.max_epochs}, as another epoch of about "
            f"{_duration(now - tic)} would end past the budget of {_duration(config.time_budget * 60)} "
            f"({_duration(now - started)} spent); {last_path} holds it: resume to continue")


def _train_loader(train_set: SliceDataset, config: TrainConfig, plan: TrainingPlan, epoch: int) -> DataLoader:
    """The epoch's training batches: a seeded order that depends on the epoch only, so a resumed
    run draws what an uninterrupted one would; all slices, or ``config.slices_per_epoch``."""
    order = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    sampler = RandomSampler(train_set, num_samples=config.slices_per_epoch, generator=order)
    workers = {}
    if plan.loader_workers:  # forked, so the slices in memory are shared, not pickled
        workers = {"num_workers": plan.loader_workers, "prefetch_factor": PREFETCH_BATCHES, "multiprocessing_context": "fork"}
    return DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, pin_memory=plan.pin_memory, **workers)


def _train_epoch(model, optimizer, scaler, loss_fn, loader, plan: TrainingPlan, device, bar, timer, diverged) -> list[float]:
    """Train one epoch; return the loss of each step.

    Each step's loss is read back to the host one step late, so that the GPU always has the next
    step queued while the host waits for a number (on the CPU this changes nothing). A
    non-finite loss raises ``diverged(...)`` naming its step; that step and the next have then
    changed the weights, but nothing of the epoch is ever saved.
    """
    losses: list[float] = []

    def read(step: int, loss: torch.Tensor) -> None:
        value = loss.item()
        if not math.isfinite(value):
            raise diverged(f"the loss became {value} at step {step + 1}")
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)

    layout = {"memory_format": torch.channels_last} if plan.channels_last else {}
    pending = None
    for step, (images, masks) in enumerate(loader):
        images, masks = images.to(device, non_blocking=True, **layout), masks.to(device, non_blocking=True, **layout)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, plan):
            loss = loss_fn(model(images), masks)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if pending is not None:
            read(*pending)
        pending = (step, loss.detach())
        bar.update()
        if timer is not None:
            timer.after(step)
    if pending is not None:
        read(*pending)
    return losses


class _Log:
    """Where :func:`fit` writes its estimate and epoch lines.

    In a terminal, standard output, above the text progress bar (``tqdm.write``). Where the bar
    is a widget (a Jupyter or Colab kernel), one text output that each line updates in place: an
    executed notebook then holds one output for all the lines however many epochs ran, where
    printing would leave one output per epoch (a kernel sends the lines of each epoch as a
    message of their own, and the book's executor, nbclient, keeps each message as an output).
    """

    def __init__(self, bar):
        self.bar, self.lines, self.handle = bar, [], None
        self.in_place = any(kind.__module__ == "tqdm.notebook" for kind in type(bar).__mro__)  # as tqdm.auto chose

    def write(self, line: str) -> None:
        if not self.in_place:
            self.bar.write(line)
            return
        from IPython.display import display

        self.lines.append(line)
        text = {"text/plain": "\n".join(self.lines)}
        if self.handle is None:
            self.handle = display(text, raw=True, display_id=True)
        else:
            self.handle.update(text, raw=True)


def _autocast(device: torch.device, plan: TrainingPlan):
    """Autocast to the plan's dtype, or nothing for float32."""
    return torch.autocast(device.type, dtype=plan.autocast) if plan.autocast is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool):
    """Set ``torch.backends.cudnn.benchmark`` while the block runs (if ``enabled``), then restore it."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepTimer:
    """Times the steps of an epoch after :data:`WARMUP_STEPS` warm-up steps, then calls
    ``report(seconds per step)`` once, after :data:`ESTIMATE_STEPS` timed steps (fewer if the
    epoch is shorter; never for an epoch of one step)."""

    def __init__(self, device: torch.device, steps: int, report):
        self.device, self.report, self.start = device, report, None
        self.last = min(WARMUP_STEPS + ESTIMATE_STEPS, steps) - 1  # the step whose end stops the clock

    def after(self, step: int) -> None:
        if step == WARMUP_STEPS - 1 and step < self.last:
            _synchronize(self.device)
            self.start = _clock()
        elif step == self.last and self.start is not None:
            _synchronize(self.device)
            self.report((_clock() - self.start) / (self.last - WARMUP_STEPS + 1))


def _validation_seconds(model, val_set: SliceDataset, plan: TrainingPlan, device) -> float:
    """Seconds a validation pass will take: the first validation study predicted once (after a
    warm-up batch), scaled to all validation slices."""
    first = val_set.studies[0].images
    with _autocast(device, plan):
        predict_probabilities(model, first[: plan.validation_batch], plan.validation_batch, device)
        _synchronize(device)
        tic = _clock()
        predict_probabilities(model, first, plan.validation_batch, device)
        _synchronize(device)
    return (_clock() - tic) * len(val_set) / first.shape[0]


def _estimate(step_seconds: float, steps: int, validation_seconds: float, epochs: int, budget_minutes: float | None, spent: float) -> str:
    """The estimate line: an epoch's time (training and validation) and the time of ``epochs``
    more, with the epochs the time budget allows if it ends the run sooner. ``spent``: seconds
    already used before the first epoch (data loading), which count against the budget."""
    epoch_seconds = step_seconds * steps + validation_seconds
    line = (f"estimate: {_duration(epoch_seconds)} per epoch ({_duration(step_seconds * steps)} of {steps} training steps, "
            f"{_duration(validation_seconds)} of validation); at most {_duration(epoch_seconds * epochs)} for "
            f"{epochs} {'epoch' if epochs == 1 else 'epochs'}")
    line += " (early stopping usually ends sooner)" if epochs > 1 else ""
    if budget_minutes is not None:
        allowed = max(1, math.floor((budget_minutes * 60 - spent) / epoch_seconds))
        if allowed < epochs:
            line += f"; the time budget of {_duration(budget_minutes * 60)} stops it after about {allowed} {'epoch' if allowed == 1 else 'epochs'}"
    return line


def _duration(seconds: float) -> str:
    """A duration for people: '0.25 s', '8.2 s', '41 s', '12 min', '1.1 h'."""
    if seconds < 1:
        return f"{seconds:.2g} s"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min" if seconds < 600 else f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _epoch_line(row: dict, max_epochs: int, stopper: EarlyStopping) -> str:
    """'epoch  3/100  train loss 0.4123  val Dice 0.6120  41.2 s  best 0.6120 (epoch 3)'."""
    width = len(str(max_epochs))
    return (f"epoch {row['epoch'] + 1:>{width}}/{max_epochs}  train loss {row['train_loss']:.4f}  val Dice {row['val_dice']:.4f}  "
            f"{row['epoch_seconds']:.1f} s  best {stopper.best_score:.4f} (epoch {stopper.best_epoch + 1})")


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
