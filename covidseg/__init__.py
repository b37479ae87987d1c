"""covidseg: reproducible COVID-19 lung-lesion segmentation on chest CT (MosMedData).

Importing the package has no side effects and no cost: nothing is downloaded, seeded, styled or
generated, and no submodule is imported. The entry points a reader calls first are reachable from
the top level and are imported on first use (a module ``__getattr__``, PEP 562)::

    import covidseg
    model = covidseg.build_model("unet-resnet34", encoder_weights=None)
    config = covidseg.get_preset("quick")

Everything else lives in the module named for its concept (``covidseg.metrics``,
``covidseg.nifti``, ...). Where to find a concept, by file (``covidseg/<file>``) and the names
that define it::

    HU windowing              preprocessing.py      preprocess_hu, HU_CLIP, hu_to_slices
    the split                 splits.py             get_split, Split
    Dice per study            metrics.py            study_scores, evaluate_studies
    ImageNet weights          models.py             build_model, load_encoder_weights
    NIfTI orientation         nifti.py              WORKING_ORIENTATION, load_volume
    early stopping            training.py           EarlyStopping
    phantom lesions           phantom/lesions.py    _plan_lesions, _render_lesions
    checkpoint resume         checkpoint.py         save_checkpoint, load_checkpoint
    bootstrap/paired tests    stats.py              mean_ci, paired_test, holm
    slice grid                viz.py                slice_grid
    lung box                  lung_box.py           lung_box
    download verification     download.py           git_blob_sha1, read_manifest
    run card                  run_card.py           RunCard
    Colab setup               colab.py              prepare, SETUP_CELL, INSTALL_REQUIREMENT
    batch-norm folding        fast_inference.py     fold_batch_norm, inference_model
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # the one place: pyproject.toml and the tag the book installs (covidseg.colab) follow it

_ENTRY_POINTS = {
    "build_model": "models",
    "MODEL_NAMES": "models",
    "TrainConfig": "config",
    "get_preset": "config",
    "fit": "training",
    "evaluate_run": "evaluation",
    "evaluate_studies": "metrics",
    "predict_file": "prediction",
    "load_volume": "nifti",
    "get_split": "splits",
    "ensure_phantom": "phantom",
    "write_phantom": "phantom",
}
"""Top-level name -> the module (``covidseg.<module>``) that defines it. A name equal to a
submodule's (``download``) cannot be listed: importing the submodule rebinds it."""

__all__ = ["__version__", *_ENTRY_POINTS]


def __getattr__(name: str):
    module = _ENTRY_POINTS.get(name)
    if module is None:
        raise AttributeError(f"module 'covidseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ENTRY_POINTS))
