"""Training on a GPU: the plain and the tuned path of each thesis model, in the same run.

For each model, :func:`covidseg.training.fit` trains twice at the thesis settings (512 x 512,
batch 8, Adam 1e-4, Dice loss, mixed precision) from random encoder weights (the machine may be
offline), for the same number of epochs and steps (early stopping off):

- ``plain``: ``fast_gpu=False``, the CUDA path before it was tuned: float16 autocast with a
  gradient scaler, contiguous layout, one process loading batches, validation at the training
  batch size;
- ``tuned``: ``fast_gpu=True`` (the default): the plan :func:`covidseg.training.plan_training`
  chooses: channels-last, cuDNN autotuning, bfloat16 where the GPU has it natively, fused Adam,
  loader workers, 4x larger validation batches;
- ``compiled`` (only with ``--variants ... compiled``): ``tuned`` plus ``torch.compile`` of the
  model (``nn.Module.compile``), to decide whether compiling pays; ``fit`` has no switch for it.

The variants of a model run one after the other (plain, tuned, ...), models in turn. Reported per
model and variant: training images/s (batch size / median step time; a step is timed from one
loss computation to the next, so loading, forward, backward and the optimiser are all in it), the
epoch time (with validation), peak GPU memory, the validation per-study Dice after each epoch
(so after the same number of steps in each variant), and the plan used; per model, the tuned
path's speed-up over the plain one (images/s and epoch time) and its Dice difference. With
``--seeds 0 1``, each variant trains once per seed: the spread of the Dice between seeds is the
noise a difference between variants is measured against. Also per model: prediction time per
validation study (``predict_probabilities``, AMP) and the forward FLOPs per image, with the
training FLOP rate reached as a fraction of a bfloat16 matmul's, measured in the same run.

The phantom is generated at ``--phantom-size`` px (128 by default: generating 58 studies at 512 px
takes minutes) and :class:`~covidseg.dataset.SliceDataset` resizes it to ``--size``: the images
are smoother than real 512 px data, the computation is the same. Preprocessed slices are cached
(``fit(cache_dir=...)``), so only the first training decodes the studies.

Usage::

    python benchmarks/gpu.py                       # on a CUDA machine; writes results/gpu.json
    python benchmarks/gpu.py --device cpu --size 32 --phantom-size 32 --epochs 2 --slices-per-epoch 32 \\
        --matmul-size 256 --results-name gpu_cpu_smoke   # a smoke test of the script (no GPU figures)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch

import covidseg.training as training
from covidseg.config import get_preset
from covidseg.dataset import SliceDataset
from covidseg.models import MODEL_NAMES, build_model
from covidseg.mosmed import annotated_studies
from covidseg.phantom import ensure_phantom
from covidseg.prediction import load_trained_model, predict_probabilities
from covidseg.sources import data_source
from covidseg.splits import get_split

VARIANTS = ("plain", "tuned", "compiled")

DATASHEET_BF16_DENSE_TFLOPS = {  # dense (no sparsity) bfloat16 tensor-core peaks
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,
    "A100": 312.0,
    "L4": 121.0,
    "A10": 125.0,
    "T4": 65.0,  # float16; the T4 has no bfloat16 tensor cores
}


def datasheet_peak(device_name: str) -> float | None:
    for key, value in DATASHEET_BF16_DENSE_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, n: int, repeat: int = 20) -> dict:
    """TFLOP/s of an ``n``³ bfloat16 matmul (median of ``repeat`` timed calls after warm-up)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - tic)
    seconds = statistics.median(times)
    return {"n": n, "dtype": "bfloat16", "median_s": seconds, "tflops": 2 * n**3 / seconds / 1e12,
            "spread": round((max(times) - min(times)) / seconds, 3)}


@dataclasses.dataclass
class _Patched:
    """``fit``'s model and loss, watched: each loss computation stamps the step clock, and the
    ``compiled`` variant compiles the model in place (its state dict keeps its keys)."""

    clock: _common.StepClock
    compile: bool

    def __enter__(self):
        self.build_model, self.build_loss = training.build_model, training.build_loss
        training.build_model, training.build_loss = self._model, self._loss
        return self

    def __exit__(self, *exc):
        training.build_model, training.build_loss = self.build_model, self.build_loss

    def _model(self, *args, **kwargs):
        model = self.build_model(*args, **kwargs)
        if self.compile:
            model.compile()
        return model

    def _loss(self, name):
        loss = self.build_loss(name)

        def stamped(logits, target):
            self.clock.stamps.append(time.perf_counter())  # outside the model: compiling cannot move it
            return loss(logits, target)

        return stamped


def _plan(config, device) -> dict:
    plan = dataclasses.asdict(training._device_plan(config, device))
    plan["autocast"] = str(plan["autocast"]).removeprefix("torch.") if plan["autocast"] is not None else "float32"
    return plan


def train_one(model_name: str, variant: str, seed: int, args, data_dir: Path, cache_dir: Path, device: torch.device, run_dir: Path) -> dict:
    """One ``fit`` of ``model_name`` in ``variant``: its speed, memory and validation Dice."""
    config = get_preset("thesis").replace(
        model=model_name, encoder_weights=None, image_size=args.size, max_epochs=args.epochs, patience=args.epochs,
        batch_size=args.batch_size, device=str(device), amp=True, fast_gpu=variant != "plain", seed=seed,
        slices_per_epoch=args.slices_per_epoch,
    )
    clock = _common.StepClock()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with _Patched(clock, compile=variant == "compiled"):
        tic = time.perf_counter()
        result = training.fit(config, run_dir, data_dir=data_dir, progress=False, cache_dir=cache_dir)
        wall = time.perf_counter() - tic
    steps = clock.step_times(skip=args.skip)
    epochs = [row["epoch_seconds"] for row in result.history]
    out = {
        "seed": seed,
        "plan": _plan(config, device),
        "epochs_run": len(result.history),
        "steps_run": len(clock.stamps),
        "val_dice_per_epoch": [round(row["val_dice"], 4) for row in result.history],
        "val_dice_final": round(result.history[-1]["val_dice"], 4),
        "fit_wall_s": round(wall, 1),
        "epoch_s": [round(s, 2) for s in epochs],
        "median_epoch_s_after_first": round(statistics.median(epochs[1:]), 2) if len(epochs) > 1 else None,
        "median_step_s": round(statistics.median(steps), 5) if steps else None,
        "train_images_per_s": round(config.batch_size / statistics.median(steps), 1) if steps else None,
    }
    if device.type == "cuda":
        out["peak_gpu_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out["peak_gpu_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return out


def predict_timing(run_dir: Path, args, data_dir: Path, cache_dir: Path, device: torch.device) -> dict:
    """Prediction of every validation study with AMP, after one warm-up study."""
    model, config = load_trained_model(run_dir, str(device))
    val = SliceDataset(annotated_studies(data_dir, get_split(config.split).val), args.size, cache_dir)
    predict_probabilities(model, val.studies[0].images, args.batch_size, device, amp=True)
    per_study, slices = [], []
    for entry in val.studies:
        synchronize(device)
        tic = time.perf_counter()
        predict_probabilities(model, entry.images, args.batch_size, device, amp=True)
        synchronize(device)
        per_study.append(time.perf_counter() - tic)
        slices.append(entry.images.shape[0])
    return {
        "predict_s_per_study": {"median": round(statistics.median(per_study), 4), "min": round(min(per_study), 4),
                                "max": round(max(per_study), 4), "studies": len(per_study)},
        "predict_slices_per_s": round(sum(slices) / sum(per_study), 1),
    }


def compare(entries: dict[str, list[dict]]) -> dict:
    """Each variant against ``plain``, seed by seed: images/s and epoch-time ratios (> 1: faster),
    and the difference of the final validation Dice; with the Dice spread between seeds."""
    out = {}
    for variant, runs in entries.items():
        if variant == "plain" or "plain" not in entries:
            continue
        pairs = list(zip(entries["plain"], runs))
        speed = [b["train_images_per_s"] / a["train_images_per_s"] for a, b in pairs if a["train_images_per_s"] and b["train_images_per_s"]]
        epoch = [a["median_epoch_s_after_first"] / b["median_epoch_s_after_first"] for a, b in pairs
                 if a["median_epoch_s_after_first"] and b["median_epoch_s_after_first"]]
        out[variant] = {
            "images_per_s_ratio": [round(r, 3) for r in speed],
            "epoch_time_ratio": [round(r, 3) for r in epoch],
            "val_dice_difference": [round(b["val_dice_final"] - a["val_dice_final"], 4) for a, b in pairs],
        }
    for variant, runs in entries.items():
        dice = [run["val_dice_final"] for run in runs]
        if len(dice) > 1:
            out.setdefault("seed_spread_of_val_dice", {})[variant] = round(max(dice) - min(dice), 4)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data", type=Path, default=None, help="a MosMedData folder (default: the phantom at --phantom-size)")
    parser.add_argument("--size", type=int, default=512, help="image size the models train at (default 512)")
    parser.add_argument("--phantom-size", type=int, default=128, help="size the phantom is generated at (default 128)")
    parser.add_argument("--models", nargs="*", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--variants", nargs="*", default=["plain", "tuned"], choices=VARIANTS)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="each variant trains once per seed (default: 0)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per training; early stopping is off (default 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="thesis: 8")
    parser.add_argument("--slices-per-epoch", type=int, default=None, help="default: every training slice")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the step time")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--time-budget", type=float, default=540.0, help="seconds; models not started by then are skipped")
    _common.add_results_argument(parser, "gpu")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; for a smoke test on the CPU pass --device cpu and small sizes")
    machine = _common.machine_info()

    ceiling = matmul_ceiling(device, args.matmul_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine["cpu"]
    peak = datasheet_peak(name) if device.type == "cuda" else None
    ceiling["datasheet_bf16_dense_tflops"] = peak
    ceiling["fraction_of_datasheet"] = round(ceiling["tflops"] / peak, 3) if peak else None
    print(f"bf16 matmul {args.matmul_size}^3: {ceiling['tflops']:.4g} TFLOP/s", file=sys.stderr)

    data_dir = args.data or ensure_phantom(args.phantom_size, progress=True)
    settings = {
        "device": name,
        "data": data_source(data_dir),
        "image_size": args.size,
        "phantom_size": args.phantom_size if args.data is None else None,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "early_stopping": False,
        "slices_per_epoch": args.slices_per_epoch or "all",
        "variants": args.variants,
        "seeds": args.seeds,
        "amp": True,
        "encoder_weights": None,
    }
    notes = ["training FLOP rate = 3 x forward FLOPs x images/s (backward ~ 2x forward)"]
    if device.type != "cuda":
        notes.append("CPU SMOKE RUN: on the CPU every variant trains the same plain float32 plan, so its figures check "
                     "the script end to end and say nothing about the tuned GPU path")
    models, skipped = {}, []

    def save(finished: bool) -> dict:
        """Write the results so far: a run cut short by its time limit still leaves every finished model."""
        results = {
            "settings": settings,
            "matmul_ceiling": ceiling,
            "models": models,
            "skipped_for_time": skipped,
            "finished": finished,
            "total_s": round(time.perf_counter() - started, 1),
            "notes": notes,
        }
        _common.write_results(args.results_name, results, machine)
        return results

    save(finished=False)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir, run_root = Path(tmp) / "cache", Path(tmp) / "runs"
        for model_name in args.models:
            if time.perf_counter() - started > args.time_budget:
                skipped.append(model_name)
                continue
            entries: dict[str, list[dict]] = {variant: [] for variant in args.variants}
            for seed in args.seeds:
                for variant in args.variants:
                    print(f"training {model_name} ({variant}, seed {seed}) ...", file=sys.stderr, flush=True)
                    run_dir = run_root / f"{model_name}-{variant}-{seed}"
                    entries[variant].append(train_one(model_name, variant, seed, args, data_dir, cache_dir, device, run_dir))
                    print(f"  {entries[variant][-1]['train_images_per_s']} images/s, val Dice {entries[variant][-1]['val_dice_final']}",
                          file=sys.stderr)
            entry = {"variants": entries, "against_plain": compare(entries)}
            entry.update(predict_timing(run_root / f"{model_name}-{args.variants[0]}-{args.seeds[0]}", args, data_dir, cache_dir, device))
            flops = _common.forward_flops(build_model(model_name, encoder_weights=None).to(device), args.size, device)
            entry["forward_gflop_per_image"] = round(flops / 1e9, 2)
            for runs in entries.values():
                for run in runs:
                    if run["train_images_per_s"]:
                        achieved = 3 * flops * run["train_images_per_s"] / 1e12
                        run["train_tflops_achieved"] = round(achieved, 2)
                        run["fraction_of_matmul_ceiling"] = round(achieved / ceiling["tflops"], 4)
            models[model_name] = entry
            save(finished=False)
    return save(finished=True)


if __name__ == "__main__":
    main(sys.argv[1:])
