"""``covidseg screen`` on the CPU: studies per minute, and the scaling of two torchrun ranks.

Two parts, on unannotated phantom studies (CT-0..CT-4, 33-53 slices each) with a seeded,
untrained ``unet-resnet34`` (the timings are those of a trained model; its masks mean nothing):

1. **Throughput**: one process with ``--threads`` torch threads (default 2) screens ``--studies``
   studies at ``--size`` px (default 512): studies per minute, and how the time of one study splits
   between the lung mask and the rest (reading, prediction, volumes).
2. **Scaling**: ``--scaling-studies`` studies at ``--scaling-size`` px, one process with one thread against
   ``torchrun --nproc_per_node 2`` with one thread per rank, in fresh processes, interleaved
   (``--rounds``): efficiency = (time of one rank / time of two ranks) / 2, per round.

Usage::

    python benchmarks/screening.py
    python benchmarks/screening.py --studies 2 --rounds 1     # shorter
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import _common
import torch

from covidseg.checkpoint import save_checkpoint
from covidseg.config import get_preset
from covidseg.models import build_model


def phantom(size: int):
    """The unannotated phantom studies at ``size`` px, generated once."""
    from covidseg.phantom import is_phantom, write_phantom

    root = _common.work_dir("phantoms") / f"{size}px-seed0-unannotated"
    if not is_phantom(root):
        write_phantom(root, size=size, annotated_ids=(), unannotated=True, progress=True)
    return root


def untrained_run(model: str, size: int):
    run = _common.work_dir("runs") / f"untrained-{model}-{size}px"
    if not (run / "best.pt").is_file():
        torch.manual_seed(0)
        config = get_preset("quick").replace(model=model, image_size=size, encoder_weights=None)
        net = build_model(model, encoder_weights=None)
        save_checkpoint({"model_name": model, "config": config.to_dict(), "model": net.state_dict(), "epoch": 0, "history": []}, run / "best.pt")
    return run


def screen_command(data, run, out, studies: list[str], ranks: int) -> list[str]:
    """A fresh-process ``covidseg screen`` of ``studies`` (through a small driver for ``only``)."""
    code = (
        "import sys; from covidseg.screening import screen; "
        f"screen({str(data)!r}, {str(run)!r}, {str(out)!r}, device='cpu', progress=False, only={studies!r})"
    )
    driver = _common.work_dir("drivers") / "screen_only.py"
    driver.write_text(code + "\n")
    if ranks == 1:
        return [sys.executable, str(driver)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), str(driver)]


def timed_run(command: list[str], threads: int, out) -> float:
    for stale in [out, *out.parent.glob(out.name + ".part*")]:
        stale.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(_common.REPO)}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet-resnet34")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--scaling-size", type=int, default=256)
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--scaling-studies", type=int, default=4, help="an even number keeps the two ranks balanced")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    _common.add_results_argument(parser, "screening")
    args = parser.parse_args()
    machine = _common.machine_info()

    from covidseg.lungs import segment_lungs
    from covidseg.mosmed import discover_studies
    from covidseg.nifti import load_volume
    from covidseg.screening import read_rows

    data = phantom(args.size)
    studies = [s for s in discover_studies(data)][: args.studies]
    names = [s.name for s in studies]
    run = untrained_run(args.model, args.size)
    work = _common.work_dir("screening")

    # 1. throughput in one process
    out = work / "throughput.csv"
    seconds = timed_run(screen_command(data, run, out, names, 1), args.threads, out)
    rows = read_rows(out)
    lung_seconds = []
    for study in studies:
        volume = load_volume(study.image)
        start = time.perf_counter()
        segment_lungs(volume.array, volume.affine)
        lung_seconds.append(time.perf_counter() - start)
    per_study = [float(rows[n]["seconds"]) for n in names]
    throughput = {
        "studies": len(names),
        "slices": [int(load_volume(s.image).array.shape[2]) for s in studies],
        "wall_seconds": round(seconds, 1),
        "studies_per_minute": round(60 * len(names) / seconds, 2),
        "seconds_per_study_in_csv": per_study,
        "lung_mask_seconds_per_study": [round(s, 2) for s in lung_seconds],
        "lung_mask_share": round(sum(lung_seconds) / sum(per_study), 3),
        "threads": args.threads,
        "size": args.size,
    }
    print(f"throughput: {throughput['studies_per_minute']} studies/min at {args.size} px, {args.threads} threads", file=sys.stderr)

    # 2. scaling: one rank against two, one thread each, interleaved
    scaling_data = phantom(args.scaling_size)
    scaling_names = [s.name for s in discover_studies(scaling_data)][: args.scaling_studies]
    scaling_run = untrained_run(args.model, args.scaling_size)
    one, two = work / "one-rank.csv", work / "two-ranks.csv"
    timed_run(screen_command(scaling_data, scaling_run, one, scaling_names[:2], 1), 1, one)  # warm-up
    rounds = []
    for _ in range(args.rounds):
        t1 = timed_run(screen_command(scaling_data, scaling_run, one, scaling_names, 1), 1, one)
        t2 = timed_run(screen_command(scaling_data, scaling_run, two, scaling_names, 2), 1, two)
        rounds.append({"one_rank_s": round(t1, 1), "two_ranks_s": round(t2, 1), "efficiency": round(t1 / t2 / 2, 3)})
        print(f"scaling round: {rounds[-1]}", file=sys.stderr)
    same = [{k: v for k, v in r.items() if k != "seconds"} for r in read_rows(one).values()] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in read_rows(two).values()
    ]
    scaling = {
        "studies": len(scaling_names),
        "size": args.scaling_size,
        "rounds": rounds,
        "efficiency_median": statistics.median(r["efficiency"] for r in rounds),
        "same_csv_without_seconds": same,
    }
    shutil.rmtree(work, ignore_errors=True)
    path = _common.write_results(args.results_name, {"benchmark": "screening", "model": args.model, "weights": "seeded, untrained",
                                               "throughput": throughput, "scaling": scaling}, machine)
    print(path)


if __name__ == "__main__":
    main()
