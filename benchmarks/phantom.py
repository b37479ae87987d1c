"""The phantom against the real masks: lesion-shape statistics, noise and generation time.

Two modes:

- ``--measure-real MASKS``: measure the lesion-shape statistics of the 50 real MosMedData masks
  (a folder of ``study_NNNN_mask.nii.gz``) and write them as package data,
  ``covidseg/data/real_mask_statistics.json`` (derived figures only; no mask is copied);
- by default: generate the 50 annotated studies at 512 px, compute the same statistics on their
  masks and check them against :data:`covidseg.phantom.calibration.TARGETS`; measure the noise
  standard deviation in fat, muscle and air (from the label maps, against the same study generated
  without noise) on a sample of studies; and time the generation against a baseline revision of
  the generator (``--baseline REV``, default the last commit of version 1), interleaved in fresh
  processes (new, baseline, new, baseline, ...): the full set (58 studies) at 128 px and a sample
  of studies at 512 px.

Usage::

    python benchmarks/phantom.py --measure-real ../shared/data/mosmed-masks
    python benchmarks/phantom.py                      # writes results/phantom.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import nibabel as nib
import numpy as np

from covidseg.mosmed import ANNOTATED_IDS
from covidseg.phantom import PHANTOM_VERSION, generate_study, phantom_studies
from covidseg.phantom.calibration import TARGETS, lesion_shape_statistics, within_targets

FACTS_FILE = _common.REPO / "covidseg" / "data" / "real_mask_statistics.json"
BASELINE = "b4d8537"  # the generator of PHANTOM_VERSION 1, just moved into the package
NOISE_TISSUES = ("fat", "soft_tissue", "air")


def measure_real(folder: Path) -> Path:
    masks = sorted(folder.glob("study_*_mask.nii.gz"))
    ids = [int(p.name[6:10]) for p in masks]
    if ids != list(ANNOTATED_IDS):
        raise SystemExit(f"benchmarks/phantom.py: error: {folder} holds masks of {len(ids)} studies, expected the 50 of 255..304")
    stats = lesion_shape_statistics(np.asarray(nib.load(p).dataobj) for p in masks)
    document = {
        "description": "Lesion-shape statistics of the 50 expert masks of MosMedData COVID19_1110 (CT-1 studies "
        "255..304) at 512 x 512 pixels, 8 mm slices; pieces are face-connected components "
        "(4-connected in a slice, 6-connected in 3D). Measured by benchmarks/phantom.py --measure-real.",
        "statistics": stats,
    }
    FACTS_FILE.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(stats, indent=2))
    return FACTS_FILE


_GENERATE = """
import sys, time
sys.path.insert(0, {path!r})
from covidseg.phantom import generate_study, phantom_studies
plan = [s for s in phantom_studies() if {ids!r} is None or s[0] in {ids!r}]
start = time.perf_counter()
for study_id, category in plan:
    generate_study(study_id, size={size}, involvement=category)
print(time.perf_counter() - start)
"""
TIMED = {128: None, 512: (255, 268, 281, 293, 947, 1109)}
"""Studies timed at each size: the full set at 128 px, a sample at 512 px (None: all 58)."""
NOISE_SAMPLE = (12, 255, 274, 293, 1021, 1109)


def _generation_seconds(path: Path, size: int, ids) -> float:
    code = _GENERATE.format(path=str(path), size=size, ids=ids)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def time_against_baseline(baseline: str, sizes: tuple[int, ...], rounds: int) -> dict:
    """Generation seconds of this tree and of ``baseline`` (studies :data:`TIMED`), interleaved,
    each in a fresh process."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "baseline"
        old.mkdir()
        archive = subprocess.run(["git", "archive", baseline, "covidseg"], cwd=_common.REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        for size in sizes:
            new_s, old_s = [], []
            ids = TIMED.get(size)
            for _ in range(rounds):
                new_s.append(_generation_seconds(_common.REPO, size, ids))
                old_s.append(_generation_seconds(old, size, ids))
                print(f"{size} px: new {new_s[-1]:.1f} s, baseline {old_s[-1]:.1f} s", file=sys.stderr)
            ratios = [a / b for a, b in zip(new_s, old_s)]
            out[f"{size}px"] = {"studies": "all 58" if ids is None else list(ids), "new_s": new_s, "baseline_s": old_s, "ratio_median": float(np.median(ratios)), "ratios": ratios}
    return out


def noise_and_statistics(size: int) -> dict:
    """Lesion-shape statistics of the annotated studies (and the seconds they took to generate),
    and the noise SD per tissue on :data:`NOISE_SAMPLE`."""
    from covidseg.phantom import LABEL_NAMES

    start = time.perf_counter()
    masks = [generate_study(study_id, size=size)[1] for study_id in ANNOTATED_IDS]
    seconds = time.perf_counter() - start
    noise = {name: [] for name in NOISE_TISSUES}
    for study_id, category in phantom_studies():
        if study_id not in NOISE_SAMPLE:
            continue
        hu, _, _, labels = generate_study(study_id, size=size, involvement=category, return_labels=True)
        clean = generate_study(study_id, size=size, involvement=category, noise=False)[0]
        inside = hu > -1100  # the reconstruction circle's padding is not noise
        for name in NOISE_TISSUES:
            where = inside & (labels == LABEL_NAMES.index(name))  # air: as stored, cut at the -1024 floor
            noise[name].append(float(np.std(hu[where].astype(np.float32) - clean[where])))
    stats = lesion_shape_statistics(masks)
    checks = {k: {"value": v, "target": list(b), "ok": ok} for k, (v, b, ok) in within_targets(stats).items()}
    sd = {name: {"median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v))} for name, v in noise.items()}
    return {"statistics": stats, "targets": checks, "noise_sd_hu": sd, "noise_studies": list(NOISE_SAMPLE), "annotated_generation_s": seconds}


def main(argv=None) -> dict | Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure-real", type=Path, metavar="MASKS", help="measure the real masks in this folder and write the package data")
    parser.add_argument("--size", type=int, default=512, help="in-plane size for the statistics (default 512)")
    parser.add_argument("--baseline", default=BASELINE, help=f"git revision of the generator to time against (default {BASELINE})")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds per size (default 2)")
    parser.add_argument("--timing-sizes", type=int, nargs="*", default=[128, 512], help="sizes to time (default 128 512)")
    _common.add_results_argument(parser, "phantom")
    args = parser.parse_args(argv)
    if args.measure_real:
        return measure_real(args.measure_real)
    machine = _common.machine_info()
    payload = {"phantom_version": PHANTOM_VERSION, "size": args.size, **noise_and_statistics(args.size)}
    payload["real"] = json.loads(FACTS_FILE.read_text())["statistics"]
    payload["generation"] = time_against_baseline(args.baseline, tuple(args.timing_sizes), args.rounds)
    _common.write_results(args.results_name, payload, machine)
    print(json.dumps({k: payload[k] for k in ("targets", "noise_sd_hu", "generation")}, indent=2))
    return payload


if __name__ == "__main__":
    main()
