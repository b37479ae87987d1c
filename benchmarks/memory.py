"""Peak resident memory (RSS) of training and prediction, and what the dataset holds.

Each scenario runs in a fresh Python process, so that its peak (``VmHWM``) is its own:

- ``imports``: torch, segmentation_models_pytorch and covidseg imported; the floor of the others.
- ``dataset``: a :class:`~covidseg.dataset.SliceDataset` of ``--studies`` phantom studies at
  512 px. RSS growth is compared with the bytes of its arrays (float32 images, uint8 masks): a
  ratio near 1 means the dataset holds one copy of the preprocessed volumes and nothing else.
  Decoding temporaries freed to the C allocator may stay resident, so the growth is reported
  before and after ``malloc_trim(0)``; reading every item once must not add anything.
- ``training``: ``--steps`` steps of forward/backward/Adam at 512 x 512, batch 4, on slices of
  one phantom study (model, gradients, optimiser state and activations).
- ``prediction``: ``predict_file`` on a 512 x 512 x 40 phantom study, the package's path and the
  naive one of ``benchmarks/predict.py`` (the fast path keeps a channels-last copy of the model).

Usage::

    python benchmarks/memory.py
    python benchmarks/memory.py --model unet-vgg19 --steps 2
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import tempfile
from pathlib import Path

import _common

STUDY_IDS = (255, 256, 257, 258, 259, 260)
MIB = 2**20


def _trim() -> bool:
    """Return freed heap memory to the OS (glibc); ``False`` where that is not possible."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def scenario(name: str, options: dict) -> dict:
    """Run one scenario in this process; returns figures in bytes."""
    import numpy as np
    import segmentation_models_pytorch  # noqa: F401  (part of the floor)
    import torch

    from covidseg.dataset import SliceDataset
    from covidseg.mosmed import annotated_studies

    _trim()
    out = {"rss_after_imports": _common.rss_bytes()}
    if name == "imports":
        pass
    elif name == "dataset":
        ids = STUDY_IDS[: options["studies"]]
        studies = annotated_studies(_common.bench_phantom(512, ids), ids)
        before = _common.rss_bytes()
        dataset = SliceDataset(studies)
        gc.collect()
        out["rss_growth"] = _common.rss_bytes() - before
        out["trimmed"] = _trim()
        out["rss_growth_after_trim"] = _common.rss_bytes() - before
        out["array_bytes"] = sum(s.images.nbytes + s.masks.nbytes for s in dataset.studies)
        out["slices"] = len(dataset)
        for i in range(len(dataset)):
            dataset[i]
        _trim()
        out["rss_growth_after_reading_every_item"] = _common.rss_bytes() - before
        out["arrays_own_their_memory"] = all(s.images.flags.owndata or s.images.base is None for s in dataset.studies)
    elif name == "training":
        from covidseg.losses import build_loss
        from covidseg.models import build_model

        ids = STUDY_IDS[:1]
        dataset = SliceDataset(annotated_studies(_common.bench_phantom(512, ids), ids))
        batch = options["batch_size"]
        torch.manual_seed(0)
        model = build_model(options["model"], encoder_weights=None)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        loss_fn = build_loss("dice")
        _trim()
        out["rss_before_steps"] = _common.rss_bytes()
        out["parameter_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        model.train()
        middle = len(dataset) // 2
        for step in range(options["steps"]):
            items = [dataset[middle + step * batch + j] for j in range(batch)]
            images, masks = torch.stack([i for i, _ in items]), torch.stack([m for _, m in items])
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images), masks).backward()
            optimizer.step()
    elif name in ("prediction", "prediction_naive"):
        from covidseg.prediction import predict_file

        image, _ = _common.bench_study(512, 40)
        run = _common.untrained_run(options["model"], 512)
        with tempfile.TemporaryDirectory() as tmp:
            if name == "prediction":
                predict_file(run, image, Path(tmp) / "mask.nii.gz", batch_size=options["batch_size_predict"], device="cpu")
            else:
                import predict

                predict.naive_predict_file(run, image, Path(tmp) / "mask.nii.gz", batch_size=options["batch_size_predict"])
    else:
        raise ValueError(f"unknown scenario {name!r}")
    out["peak_rss"] = _common.peak_rss_bytes()
    return out


def _in_fresh_process(name: str, options: dict) -> dict:
    code = (
        f"import sys, json; sys.path[:0] = [{str(_common.BENCH_DIR)!r}]; import memory; "
        f"print(json.dumps(memory.scenario({name!r}, json.loads({json.dumps(options)!r}))))"
    )
    print(f"  scenario {name} ...", file=sys.stderr, flush=True)
    return _common.run_python(code)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet-resnet34")
    parser.add_argument("--batch-size", type=int, default=4, help="training batch (default 4)")
    parser.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    parser.add_argument("--studies", type=int, default=3, help="studies in the dataset scenario (default 3)")
    parser.add_argument("--quick", action="store_true", help="2 training steps, 2 studies")
    _common.add_results_argument(parser, "memory")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.studies = 2, 2
    machine = _common.machine_info()
    # inputs are generated here, once, so that no scenario's peak includes generating them
    _common.bench_phantom(512, STUDY_IDS[: args.studies])
    _common.bench_study(512, 40)
    _common.untrained_run(args.model, 512)
    options = {"model": args.model, "batch_size": args.batch_size, "steps": args.steps, "studies": args.studies, "batch_size_predict": 8}

    raw = {name: _in_fresh_process(name, options) for name in ("imports", "dataset", "training", "prediction", "prediction_naive")}
    mib = lambda b: round(b / MIB, 1)  # noqa: E731
    floor = raw["imports"]["peak_rss"]
    d = raw["dataset"]
    results = {
        "settings": {**options, "image_size": 512, "prediction_study": "512x512x40 phantom study"},
        "peak_rss_mib": {name: mib(r["peak_rss"]) for name, r in raw.items()},
        "peak_rss_above_imports_mib": {name: mib(r["peak_rss"] - floor) for name, r in raw.items()},
        "training": {
            "parameter_mib": mib(raw["training"]["parameter_bytes"]),
            "peak_above_start_of_steps_mib": mib(raw["training"]["peak_rss"] - raw["training"]["rss_before_steps"]),
        },
        "dataset": {
            "slices": d["slices"],
            "array_mib": mib(d["array_bytes"]),
            "rss_growth_mib": mib(d["rss_growth"]),
            "rss_growth_after_malloc_trim_mib": mib(d["rss_growth_after_trim"]),
            "growth_over_array_bytes": round(d["rss_growth_after_trim"] / d["array_bytes"], 3),
            "growth_after_reading_every_item_mib": mib(d["rss_growth_after_reading_every_item"]),
            "peak_during_construction_above_imports_mib": mib(d["peak_rss"] - floor),
        },
        "raw_bytes": raw,
    }
    _common.write_results(args.results_name, results, machine)
    print(json.dumps({k: results[k] for k in ("peak_rss_mib", "training", "dataset")}, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
