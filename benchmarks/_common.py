"""Shared code of the benchmarks: the machine description, timing, results files, work folders.

Every benchmark is a script, ``python benchmarks/<name>.py``, that writes
``benchmarks/results/<name>.json``: ``{"benchmark", "machine", "command", "settings", ...figures}``.

Timing rules (the machines these run on are small and shared):

- every measured call is preceded by untimed warm-up calls;
- variants that are compared are run *interleaved* (A, B, C, A, B, C, ...), so a burst of load
  from another process hits all of them alike, and their ratio is taken *within each round*;
- the median is reported with the min and max of the samples (the spread), never a single run;
- wall time is what counts; the load average before and after each benchmark is recorded so a
  noisy figure can be recognised as such.

No benchmark is a test: nothing here asserts a time.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

if str(REPO) not in sys.path:  # run as ``python benchmarks/x.py`` without installing the package
    sys.path.insert(0, str(REPO))

__all__ = [
    "REPO",
    "RESULTS_DIR",
    "Timing",
    "machine_info",
    "time_call",
    "time_interleaved",
    "paired_ratios",
    "StepClock",
    "passes_for",
    "write_results",
    "add_results_argument",
    "work_dir",
    "bench_phantom",
    "rss_bytes",
    "peak_rss_bytes",
    "run_python",
    "command_line",
]


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The SIMD extensions that matter for deep-learning kernels on x86."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni")
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """What the figures were measured on: CPU, cores, memory, library versions, threads, date."""
    import numpy
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cuda": None,
    }
    try:
        import segmentation_models_pytorch as smp
        import nibabel

        info["segmentation_models_pytorch"] = smp.__version__
        info["nibabel"] = nibabel.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda"] = {
            "device": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            "cuda_version": torch.version.cuda,
        }
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock samples of one measured thing, in seconds.

    Attributes:
        samples: One wall time per timed call (warm-up calls excluded).
        cpu_samples: CPU time of the same calls (all threads, and child processes that ended).
    """

    samples: list[float] = field(default_factory=list)
    cpu_samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """``(max - min) / median``: 0.1 means the samples lie within 10% of each other."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median else 0.0

    def to_dict(self, per: float | None = None, unit: str = "s") -> dict:
        """Median, min, max and spread; with ``per``, also the rate ``per / median`` (e.g. slices/s)."""
        out = {
            "median_s": round(self.median, 6),
            "min_s": round(min(self.samples), 6),
            "max_s": round(max(self.samples), 6),
            "spread": round(self.spread, 3),
            "n": len(self.samples),
            "samples_s": [round(s, 6) for s in self.samples],
        }
        if self.cpu_samples:
            out["cpu_median_s"] = round(statistics.median(self.cpu_samples), 6)
        if per is not None:
            out[f"median_{unit}"] = round(per / self.median, 3)
        return out


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    value = fn()
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    return wall, cpu, value


def time_call(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> Timing:
    """Time ``repeat`` calls of ``fn`` after ``warmup`` untimed ones."""
    return time_interleaved({"_": fn}, repeat, warmup)["_"]


def time_interleaved(variants: dict[str, Callable[[], object]], repeat: int = 3, warmup: int = 1, progress: bool = True) -> dict[str, Timing]:
    """Time several variants round-robin: ``warmup`` rounds untimed, then ``repeat`` timed rounds.

    Round ``r`` runs every variant once, in the same order, so that load from other processes
    affects all of them within that round alike; :func:`paired_ratios` uses that pairing.
    """
    timings = {name: Timing() for name in variants}
    for round_index in range(warmup + repeat):
        for name, fn in variants.items():
            gc.collect()
            wall, cpu, _ = _timed(fn)
            if round_index >= warmup:
                timings[name].samples.append(wall)
                timings[name].cpu_samples.append(cpu)
            if progress:
                tag = "warm-up" if round_index < warmup else f"round {round_index - warmup + 1}/{repeat}"
                print(f"  {tag:>12}  {name:<28} {wall:8.3f} s", file=sys.stderr, flush=True)
    return timings


def passes_for(fn: Callable[[int], object], min_seconds: float) -> int:
    """How many repetitions ``fn(passes)`` needs to last ``min_seconds`` (from one untimed trial)."""
    wall, _, _ = _timed(lambda: fn(1))
    return max(1, int(min_seconds / max(wall, 1e-9)) + 1)


class StepClock:
    """Records ``time.perf_counter()`` at the start of each training-mode forward of a model.

    The time between two consecutive stamps is one full training step, whatever the loop does
    between forwards (data, loss, backward, optimiser, bookkeeping). Attach it to the model
    before the loop; eval-mode forwards (validation) leave no stamp.
    """

    def __init__(self):
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []

    def attach(self, model):
        model.register_forward_pre_hook(self._hook)
        return model

    def _hook(self, module, inputs):
        if module.training:
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(time.process_time())

    def step_times(self, skip: int = 0, cpu: bool = False) -> list[float]:
        """Durations of steps ``skip .. n-2`` (each from one forward's start to the next's), in wall
        time, or with ``cpu`` in CPU time of this process (all threads), which time spent waiting
        for the CPU while other processes run does not inflate."""
        stamps = self.cpu_stamps if cpu else self.stamps
        return [b - a for a, b in zip(stamps[skip:], stamps[skip + 1 :])]


def forward_flops(model, size: int, device="cpu") -> int:
    """FLOPs of one forward pass of ``model`` on one ``size`` x ``size`` image (torch's FLOP counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 1, size, size, device=device))
    return int(counter.get_total_flops())


def _significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def paired_ratios(timings: dict[str, Timing], baseline: str, work: dict[str, float] | None = None) -> dict[str, dict]:
    """Speed-up of each variant over ``baseline``, taken round by round (baseline time / variant time).

    Args:
        timings: From :func:`time_interleaved`.
        baseline: The variant the others are compared with.
        work: Items each variant processes per call, where they differ; the ratio is then one of
            rates (items per second), not of times.

    Returns:
        ``name -> {"median", "min", "max"}`` of the per-round ratios (> 1 means faster).
    """
    work = work or {}
    base = [t / work.get(baseline, 1.0) for t in timings[baseline].samples]
    out = {}
    for name, timing in timings.items():
        ratios = [b / (v / work.get(name, 1.0)) for b, v in zip(base, timing.samples) if v > 0]
        out[name] = {"median": _significant(statistics.median(ratios)), "min": _significant(min(ratios)), "max": _significant(max(ratios))}
    return out


# ---------------------------------------------------------------------------------------------
# Results and work folders
# ---------------------------------------------------------------------------------------------


def add_results_argument(parser, name: str) -> None:
    """``--results-name`` (default ``name``): a second, independent run can be kept beside the first."""
    parser.add_argument("--results-name", default=name, help=f"write results/<NAME>.json (default {name})")


def command_line() -> str:
    """The command that produced the results, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def write_results(name: str, payload: dict, machine: dict | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically, with the machine and the command.

    ``machine`` is the description taken at the start; the load average at the end is added.
    """
    machine = dict(machine or machine_info())
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    document = {"benchmark": name, "command": command_line(), "machine": machine, **payload}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    target = RESULTS_DIR / f"{name}.json"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, target)
    print(f"wrote {target.relative_to(REPO)}", file=sys.stderr)
    return target


def work_dir(name: str) -> Path:
    """A persistent scratch folder for generated inputs (phantoms, trained weights), outside the repo.

    ``$COVIDSEG_BENCH_DIR`` if set, else ``<covidseg cache>/benchmarks/<name>``.
    """
    from covidseg.phantom import default_phantom_dir

    root = Path(os.environ["COVIDSEG_BENCH_DIR"]) if os.environ.get("COVIDSEG_BENCH_DIR") else default_phantom_dir(0).parent / "benchmarks"
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def bench_phantom(size: int, ids: tuple[int, ...], seed: int = 0) -> Path:
    """A small phantom of only the annotated studies ``ids`` at ``size`` px, generated once and reused."""
    from covidseg.phantom import is_phantom, write_phantom

    root = work_dir("phantoms") / (f"{size}px-seed{seed}-" + "-".join(str(i) for i in ids))
    if not is_phantom(root):
        write_phantom(root, size=size, seed=seed, annotated_ids=tuple(ids), unannotated=False, progress=True)
    return root


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        return _status_kib("VmRSS") * 1024
    except (OSError, KeyError):
        import psutil

        return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``VmHWM``; ``ru_maxrss`` elsewhere)."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_python(code: str, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (repo root importable); it must print one JSON line last.

    Used to measure one thing per process (peak RSS, or a CLI's wall time from a cold start).

    Returns:
        The parsed last line of standard output, with ``"wall_s"`` of the whole process added.
    """
    environment = dict(os.environ, **(env or {}))
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"subprocess failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    result["wall_s"] = round(wall, 3)
    return result


# ---------------------------------------------------------------------------------------------
# Inputs shared by several benchmarks
# ---------------------------------------------------------------------------------------------

STUDY_ID = 255
"""The phantom study used as a 'typical CT-1 study' (it has lesions on about half of its slices)."""


def bench_study(size: int = 512, n_slices: int = 40, study_id: int = STUDY_ID, seed: int = 0) -> tuple[Path, Path]:
    """One phantom study of ``size`` x ``size`` x ``n_slices`` as NIfTI files (CT in HU, and its mask).

    Generated once with :func:`covidseg.phantom.generate_study` and reused.

    Returns:
        ``(image, mask)`` paths.
    """
    import nibabel as nib

    from covidseg.nifti import write_image_atomically
    from covidseg.phantom import generate_study

    folder = work_dir("studies")
    image = folder / f"study_{study_id:04d}-{size}px-{n_slices}slices-seed{seed}.nii.gz"
    mask = image.with_name(image.name.replace(".nii.gz", "_mask.nii.gz"))
    if not (image.is_file() and mask.is_file()):
        hu, truth, affine = generate_study(study_id, size=size, n_slices=n_slices, seed=seed)
        for array, path in ((truth, mask), (hu, image)):  # the image last: its presence means both exist
            nifti = nib.Nifti1Image(array, affine)
            nifti.set_qform(affine, code=1)
            nifti.set_sform(affine, code=1)
            write_image_atomically(nifti, path)
    return image, mask


def untrained_run(model_name: str, image_size: int = 512, seed: int = 0, width: int = 64) -> Path:
    """A run folder holding a seeded, *untrained* model: enough to time ``covidseg predict``.

    Its masks mean nothing; use it only where the weights do not matter (time, memory).
    """
    import torch

    from covidseg.checkpoint import save_checkpoint
    from covidseg.config import get_preset
    from covidseg.models import build_model

    run = work_dir("runs") / f"untrained-{model_name}-{image_size}px-seed{seed}"
    if not (run / "best.pt").is_file():
        config = get_preset("thesis").replace(model=model_name, encoder_weights=None, image_size=image_size, unet_width=width, seed=seed)
        torch.manual_seed(seed)
        model = build_model(model_name, encoder_weights=None, width=width)
        save_checkpoint({"model_name": model_name, "config": config.to_dict(), "model": model.state_dict(), "epoch": 0, "history": []}, run / "best.pt")
    return run
