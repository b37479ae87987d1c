"""Training and prediction on a GPU: the four thesis models at 512 x 512 on the phantom.

For each model, :func:`covidseg.training.fit` with the thesis preset (Adam 1e-4, Dice loss,
batch 8, mixed precision, early stopping on validation per-study Dice), from random encoder
weights (the machine may be offline), with the epochs capped (``--epochs``, ``--patience``) so
that the whole run fits in about ten minutes on one H100. Reported per model:

- training images/s (batch size / median step time; steps timed from one forward's start to the
  next's, so data loading and the optimiser are included), and the epoch time (with validation);
- peak GPU memory (``torch.cuda.max_memory_allocated`` and ``..._reserved``);
- prediction time per validation study (``predict_probabilities`` with AMP), and per slice;
- the model's forward FLOPs per image (``torch.utils.flop_counter``) and the training FLOP rate
  it reached (3x forward FLOPs x images/s), as a fraction of the measured matmul ceiling.

The matmul ceiling is measured in the same run: a bfloat16 ``--matmul-size``³ matmul (8192 by
default), repeated, giving TFLOP/s; where the GPU's datasheet peak is known it is given too.

The phantom is generated at ``--phantom-size`` px (128 by default: generating 58 studies at 512 px
takes minutes) and :class:`~covidseg.dataset.SliceDataset` resizes it to ``--size``: the images
are smoother than real 512 px data, the computation is the same. Preprocessed slices are cached
(``fit(cache_dir=...)``), so only the first model decodes the studies.

Usage::

    python benchmarks/gpu.py                       # on a CUDA machine; writes results/gpu.json
    python benchmarks/gpu.py --size 64 --epochs 1 --device cpu --matmul-size 256 \\
        --slices-per-epoch 32 --results-name gpu_cpu_smoke      # a smoke test of the script
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

import covidseg.training as training
from covidseg.config import get_preset
from covidseg.dataset import SliceDataset
from covidseg.models import MODEL_NAMES, build_model
from covidseg.mosmed import annotated_studies
from covidseg.phantom import ensure_phantom
from covidseg.prediction import load_trained_model, predict_probabilities
from covidseg.splits import get_split

DATASHEET_BF16_DENSE_TFLOPS = {  # dense (no sparsity) bfloat16 tensor-core peaks
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,
    "A100": 312.0,
    "L4": 121.0,
    "A10": 125.0,
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


def train_one(model_name: str, args, data_dir: Path, cache_dir: Path, device: torch.device, run_root: Path) -> dict:
    config = get_preset("thesis").replace(
        model=model_name, encoder_weights=None, image_size=args.size, max_epochs=args.epochs, patience=args.patience,
        batch_size=args.batch_size, device=str(device), amp=True,
    )
    if args.slices_per_epoch:
        config = config.replace(slices_per_epoch=args.slices_per_epoch)
    clock = _common.StepClock()
    original = training.build_model
    training.build_model = lambda *a, **k: clock.attach(original(*a, **k))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run_dir = run_root / model_name
    try:
        tic = time.perf_counter()
        result = training.fit(config, run_dir, data_dir=data_dir, progress=False, cache_dir=cache_dir)
        wall = time.perf_counter() - tic
    finally:
        training.build_model = original
    steps = clock.step_times(skip=args.skip)
    out = {
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "best_val_dice": round(result.best_val_dice, 4),
        "fit_wall_s": round(wall, 1),
        "epoch_s": [round(row["epoch_seconds"], 2) for row in result.history],
        "median_step_s": round(statistics.median(steps), 5) if steps else None,
        "train_images_per_s": round(config.batch_size / statistics.median(steps), 1) if steps else None,
    }
    if device.type == "cuda":
        out["peak_gpu_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out["peak_gpu_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)

    # prediction: every validation study, with AMP, after one warm-up study
    model, _ = load_trained_model(run_dir, str(device))
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
    out["predict_s_per_study"] = {"median": round(statistics.median(per_study), 4), "min": round(min(per_study), 4),
                                  "max": round(max(per_study), 4), "studies": len(per_study)}
    out["predict_slices_per_s"] = round(sum(slices) / sum(per_study), 1)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512, help="image size the models train at (default 512)")
    parser.add_argument("--phantom-size", type=int, default=128, help="size the phantom is generated at (default 128)")
    parser.add_argument("--models", nargs="*", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--epochs", type=int, default=8, help="epoch cap per model (default 8)")
    parser.add_argument("--patience", type=int, default=3, help="early-stopping patience (default 3)")
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

    data_dir = ensure_phantom(args.phantom_size, progress=True)
    settings = {
        "device": name,
        "image_size": args.size,
        "phantom_size": args.phantom_size,
        "batch_size": args.batch_size,
        "epochs_cap": args.epochs,
        "patience": args.patience,
        "slices_per_epoch": args.slices_per_epoch or "all",
        "amp": True,
        "encoder_weights": None,
    }
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
            "notes": "training FLOP rate = 3 x forward FLOPs x images/s (backward ~ 2x forward)",
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
            print(f"training {model_name} ...", file=sys.stderr, flush=True)
            entry = train_one(model_name, args, data_dir, cache_dir, device, run_root)
            flops = _common.forward_flops(build_model(model_name, encoder_weights=None).to(device), args.size, device)
            entry["forward_gflop_per_image"] = round(flops / 1e9, 2)
            if entry["train_images_per_s"]:
                achieved = 3 * flops * entry["train_images_per_s"] / 1e12
                entry["train_tflops_achieved"] = round(achieved, 2)
                entry["fraction_of_matmul_ceiling"] = round(achieved / ceiling["tflops"], 4)
            models[model_name] = entry
            print(f"  {model_name}: {entry['train_images_per_s']} images/s, {entry['epochs_run']} epochs", file=sys.stderr)
            save(finished=False)
    return save(finished=True)


if __name__ == "__main__":
    main(sys.argv[1:])
