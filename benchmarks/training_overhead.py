"""Per-step time of :func:`covidseg.training.fit` against a bare forward/backward/step loop.

Both run the same model (same seed, so the same initial weights), the same Adam optimiser and
learning rate, the same loss and the same batches: the bare loop gets exactly the batches fit's
seeded sampler draws in epoch 0, materialised in memory beforehand, so it pays nothing for data.
Its whole body is ``zero_grad; loss_fn(model(x), y).backward(); step``.

What is compared: the *training step*, measured the same way in both. A forward pre-hook on the
model records the time at the start of every training-mode forward; the time between two
consecutive ones is one full step, including everything fit does between steps (drawing and
collating the batch, ``loss.item()``, the progress bar). The first ``--skip`` steps are warm-up
and the last step has no successor, so they are left out. fit's other costs (decoding the
dataset, validating, writing checkpoints) happen once per run or per epoch, not per step; they
are reported separately, as a share of the epoch.

Check that the comparison is fair: the bare loop's mean loss equals fit's ``train_loss`` of the
epoch (same computation, bit for bit on the CPU).

Usage::

    python benchmarks/training_overhead.py                      # quick preset (the CI/book config)
    python benchmarks/training_overhead.py --model unet-resnet34
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch
from torch.utils.data import DataLoader, RandomSampler

import covidseg.training as training
from covidseg.config import get_preset
from covidseg.dataset import SliceDataset
from covidseg.losses import build_loss
from covidseg.models import MODEL_NAMES, build_model
from covidseg.mosmed import annotated_studies
from covidseg.sources import resolve_data_dir
from covidseg.splits import get_split

TARGET_RATIO = 1.05


def epoch_batches(config, train_set):
    """Exactly the batches fit draws in epoch 0 (its seeded sampler), as a list in memory."""
    order = torch.Generator().manual_seed(config.seed * 1_000_003 + 0)
    sampler = RandomSampler(train_set, num_samples=getattr(config, "slices_per_epoch", None), generator=order)
    return list(DataLoader(train_set, batch_size=config.batch_size, sampler=sampler))


def bare_loop(config, batches, clock: _common.StepClock) -> float:
    """The reference: forward, loss, backward, step; nothing else. Returns the mean loss."""
    torch.manual_seed(config.seed)
    model = clock.attach(build_model(config.model, encoder_weights=None, width=config.unet_width))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = build_loss(config.loss)
    model.train()
    losses = []
    for images, masks in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), masks)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return float(torch.stack(losses).mean())


def fit_once(config, data_dir, clock: _common.StepClock) -> tuple[dict, float]:
    """One epoch of ``fit`` with the clock on its model. Returns (history row, wall seconds)."""
    original = training.build_model
    training.build_model = lambda *a, **k: clock.attach(original(*a, **k))
    try:
        with tempfile.TemporaryDirectory() as run:
            tic = time.perf_counter()
            result = training.fit(config, Path(run) / "run", data_dir=data_dir, progress=False)
            wall = time.perf_counter() - tic
    finally:
        training.build_model = original
    return result.history[0], wall


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, choices=MODEL_NAMES, help="default: the quick preset's")
    parser.add_argument("--image-size", type=int, default=None, help="default: the quick preset's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the quick preset's")
    parser.add_argument("--slices", type=int, default=None, help="training slices per epoch (default: the preset's, else 320)")
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (each: one fit epoch, one bare pass)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 160 slices")
    _common.add_results_argument(parser, "training_overhead")
    args = parser.parse_args(argv)
    machine = _common.machine_info()

    config = get_preset("quick").replace(max_epochs=1, device="cpu", encoder_weights=None)
    changes = {"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size}
    config = config.replace(**{k: v for k, v in changes.items() if v is not None})
    slices = args.slices or (160 if args.quick else None) or getattr(config, "slices_per_epoch", None) or 320
    if hasattr(config, "slices_per_epoch"):
        config = config.replace(slices_per_epoch=slices)
    repeat = 2 if args.quick else args.repeat

    data_dir = resolve_data_dir(None, phantom_size=config.image_size, progress=True)
    train_set = SliceDataset(annotated_studies(data_dir, get_split(config.split).train), config.image_size)
    batches = epoch_batches(config, train_set)
    del train_set

    rounds = []
    for r in range(repeat):
        fit_clock, bare_clock = _common.StepClock(), _common.StepClock()
        row, fit_wall = fit_once(config, data_dir, fit_clock)
        bare_loss = bare_loop(config, batches, bare_clock)
        fit_steps, bare_steps = fit_clock.step_times(args.skip), bare_clock.step_times(args.skip)
        fit_cpu, bare_cpu = fit_clock.step_times(args.skip, cpu=True), bare_clock.step_times(args.skip, cpu=True)
        all_fit_steps = fit_clock.step_times(0)
        rounds.append({
            "fit_median_step_s": statistics.median(fit_steps),
            "bare_median_step_s": statistics.median(bare_steps),
            "fit_mean_step_s": statistics.fmean(fit_steps),
            "bare_mean_step_s": statistics.fmean(bare_steps),
            "ratio_median": statistics.median(fit_steps) / statistics.median(bare_steps),
            "ratio_mean": statistics.fmean(fit_steps) / statistics.fmean(bare_steps),
            "fit_median_step_cpu_s": statistics.median(fit_cpu),
            "bare_median_step_cpu_s": statistics.median(bare_cpu),
            "ratio_median_cpu": statistics.median(fit_cpu) / statistics.median(bare_cpu),
            "fit_epoch_s": row["epoch_seconds"],
            "fit_training_steps_s": sum(all_fit_steps) + statistics.median(all_fit_steps),  # + the last step, estimated
            "fit_wall_s": fit_wall,
            "fit_train_loss": row["train_loss"],
            "bare_mean_loss": bare_loss,
            "steps": len(fit_clock.stamps),
        })
        print(f"round {r + 1}: fit {rounds[-1]['fit_median_step_s']:.4f} s/step, bare {rounds[-1]['bare_median_step_s']:.4f} s/step, "
              f"ratio {rounds[-1]['ratio_median']:.3f} (CPU time: {rounds[-1]['ratio_median_cpu']:.3f})", file=sys.stderr)

    def summary(key):
        values = [r[key] for r in rounds]
        return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}

    same_loss = all(abs(r["fit_train_loss"] - r["bare_mean_loss"]) <= 1e-6 * max(1.0, abs(r["bare_mean_loss"])) for r in rounds)
    results = {
        "settings": {
            "model": config.model,
            "image_size": config.image_size,
            "batch_size": config.batch_size,
            "slices_per_epoch": slices,
            "optimizer": f"Adam lr {config.lr}",
            "loss": config.loss,
            "steps_per_epoch": rounds[0]["steps"],
            "steps_compared_per_round": rounds[0]["steps"] - args.skip - 1,
            "repeat": repeat,
        },
        "method": "per-step wall time (and process CPU time) from forward-start to forward-start (see the script's docstring); "
        "ratio = fit / bare per round; first steps skipped as warm-up. On a loaded machine the CPU-time ratio is the "
        "steadier one: fit and the bare loop run one after the other, not interleaved, so load changes between them "
        "move the wall-time ratio",
        "fit_over_bare_step_time": summary("ratio_median"),
        "fit_over_bare_mean_step_time": summary("ratio_mean"),
        "fit_over_bare_step_cpu_time": summary("ratio_median_cpu"),
        "fit_step_s": summary("fit_median_step_s"),
        "bare_step_s": summary("bare_median_step_s"),
        "same_loss_as_fit": same_loss,
        "outside_steps": {
            "validation_and_checkpoints_share_of_epoch": summary_fraction(rounds),
            "fit_wall_s_including_data_decoding": summary("fit_wall_s"),
            "fit_epoch_s": summary("fit_epoch_s"),
        },
        "rounds": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rounds],
        "target": {"fit_over_bare": TARGET_RATIO, "met": statistics.median(r["ratio_median"] for r in rounds) <= TARGET_RATIO},
    }
    _common.write_results(args.results_name, results, machine)
    print(f"fit / bare per step: wall {results['fit_over_bare_step_time']}, CPU {results['fit_over_bare_step_cpu_time']} "
          f"(same loss: {same_loss})")
    return results


def summary_fraction(rounds) -> dict:
    values = [(r["fit_epoch_s"] - r["fit_training_steps_s"]) / r["fit_epoch_s"] for r in rounds]
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


if __name__ == "__main__":
    main(sys.argv[1:])
