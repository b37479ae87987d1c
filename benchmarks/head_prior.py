"""How fast a model starts to learn, with and without the lesion prior in its output bias.

:func:`covidseg.models.build_model` sets the output bias to ``logit(LESION_PRIOR)`` (0.01), so that
an untrained model predicts a small lesion probability everywhere instead of 0.5. This script
trains the same configuration twice from the same seed, once as built and once with the output
bias set back to 0 (PyTorch's usual start), and records the validation per-study Dice and the
training loss after each epoch. Nothing else differs: same weights otherwise, same batches.

Usage::

    python benchmarks/head_prior.py                          # quick preset, unet, 2 epochs
    python benchmarks/head_prior.py --model unet-resnet34 --epochs 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch

import covidseg.training as training
from covidseg.config import get_preset
from covidseg.models import LESION_PRIOR, MODEL_NAMES, output_head
from covidseg.phantom import ensure_phantom


def train(config, data_dir: Path, run_dir: Path, zero_bias: bool) -> dict:
    original = training.build_model

    def build(*args, **kwargs):
        model = original(*args, **kwargs)
        if zero_bias:
            torch.nn.init.zeros_(output_head(model).bias)
        return model

    training.build_model = build
    try:
        tic = time.perf_counter()
        result = training.fit(config, run_dir, data_dir=data_dir, progress=False)
    finally:
        training.build_model = original
    return {
        "val_dice": [round(row["val_dice"], 4) for row in result.history],
        "train_loss": [round(row["train_loss"], 4) for row in result.history],
        "fit_s": round(time.perf_counter() - tic, 1),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet", choices=MODEL_NAMES)
    parser.add_argument("--preset", default="quick", choices=("quick", "thesis"))
    parser.add_argument("--epochs", type=int, default=2)
    _common.add_results_argument(parser, "head_prior")
    args = parser.parse_args(argv)
    machine = _common.machine_info()
    config = get_preset(args.preset).replace(model=args.model, max_epochs=args.epochs, encoder_weights=None)
    data_dir = ensure_phantom(config.image_size, progress=True)
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, zero_bias in (("lesion prior (as built)", False), ("zero bias", True)):
            print(f"training with {name} ...", file=sys.stderr, flush=True)
            variants[name] = train(config, data_dir, Path(tmp) / name.split()[0], zero_bias)
            print(f"  validation Dice per epoch: {variants[name]['val_dice']}", file=sys.stderr)
    results = {"config": config.to_dict(), "lesion_prior": LESION_PRIOR, "variants": variants}
    _common.write_results(args.results_name, results, machine)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
