"""How ``fit`` trains on each device (:func:`covidseg.training.plan_training`), and, on the CPU,
that the pieces of the tuned CUDA path compute what the plain path computes.

No GPU is needed: the choice is a pure function of the device's kind and capabilities, and the
tuned path's layout, loader workers, fused Adam, larger validation batches and loss scaling all
run on the CPU too when a test hands ``fit`` that plan.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import covidseg.training as training
from covidseg.checkpoint import load_checkpoint
from covidseg.config import MODEL_NAMES
from covidseg.losses import build_loss
from covidseg.models import build_model
from covidseg.splits import get_split
from covidseg.training import MAX_LOADER_WORKERS, VALIDATION_BATCH_FACTOR, TrainingPlan, fit, plan_training

from conftest import REPO, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = tiny_config(lr=1e-3, max_epochs=2, device="cpu")
"""At 1e-2, Adam turns rounding differences of a few ulps into visibly different trajectories
within two epochs; at 1e-3 they stay rounding differences."""


def test_the_cpu_and_mps_train_in_float32_whatever_the_switches():
    for device in ("cpu", "mps"):
        for amp in (True, False):
            for fast in (True, False):
                plan = plan_training(device, amp, fast, batch_size=8, bf16_native=True, spare_cpus=8)
                assert plan == TrainingPlan(None, False, False, False, False, 0, False, 8), (device, amp, fast)


@pytest.mark.parametrize(
    ("amp", "fast", "bf16_native", "dtype", "scaler"),
    [
        (True, True, True, torch.bfloat16, False),  # A100, L4, H100: bfloat16, no loss scaling
        (True, True, False, torch.float16, True),  # T4 (free Colab): its bfloat16 is emulated
        (True, False, True, torch.float16, True),  # fast_gpu off: float16 everywhere, as before the switch
        (False, True, True, None, False),  # no mixed precision: float32
    ],
)
def test_cuda_precision_follows_amp_and_the_gpus_bfloat16(amp, fast, bf16_native, dtype, scaler):
    plan = plan_training("cuda", amp, fast, batch_size=8, bf16_native=bf16_native, spare_cpus=1)
    assert (plan.autocast, plan.grad_scaler) == (dtype, scaler)
    assert plan.pin_memory


def test_the_tuned_cuda_path_is_one_switch():
    tuned = plan_training("cuda", True, True, batch_size=8, bf16_native=True, spare_cpus=1)
    assert tuned.channels_last and tuned.cudnn_benchmark and tuned.fused_adam
    assert tuned.validation_batch == 8 * VALIDATION_BATCH_FACTOR and tuned.loader_workers == 1
    plain = plan_training("cuda", True, False, batch_size=8, bf16_native=True, spare_cpus=1)
    assert not (plain.channels_last or plain.cudnn_benchmark or plain.fused_adam or plain.loader_workers)
    assert plain.validation_batch == 8
    assert plan_training("cuda", True, True, 8, True, spare_cpus=0).loader_workers == 0  # no spare CPU or no fork
    assert plan_training("cuda", True, True, 8, True, spare_cpus=64).loader_workers == MAX_LOADER_WORKERS


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_in_channels_last_layout_computes_the_same_logits_and_gradients(name):
    torch.manual_seed(0)
    plain = build_model(name, encoder_weights=None, width=4)
    tuned = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    images, masks = torch.randn(4, 1, 64, 64), (torch.rand(4, 1, 64, 64) > 0.8).float()
    logits, gradients = [], []
    for model, layout in ((plain, torch.contiguous_format), (tuned, torch.channels_last)):
        out = model.train()(images.contiguous(memory_format=layout))
        build_loss("dice")(out, masks.contiguous(memory_format=layout)).backward()
        logits.append(out)
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert tuned(images.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    relative = lambda a, b: float((a - b).detach().norm() / a.detach().norm())  # noqa: E731
    assert relative(*logits) < 1e-4
    # At random initialisation, batch norm over four small maps makes the gradients ill-conditioned:
    # the plain layout's float32 gradients differ from float64's by up to 1.3 % (VGG19), the
    # channels-last ones from the plain ones by up to 2.7 % (MobileNetV2). A layout mistake
    # (a permuted axis) changes them entirely.
    assert relative(*gradients) < 0.1


def _history(result) -> list[tuple]:
    return [(row["train_loss"], row["val_dice"]) for row in result.history]


@pytest.fixture(scope="module")
def plain(tiny50, tmp_path_factory):
    """A CPU run on the plain path (what ``fit`` does on the CPU)."""
    return fit(CONFIG, tmp_path_factory.mktemp("plain") / "run", data_dir=tiny50, progress=False)


def _fit_with(plan: TrainingPlan, data, run, monkeypatch, **kwargs):
    monkeypatch.setattr(training, "_device_plan", lambda config, device: plan)
    return fit(CONFIG, run, data_dir=data, progress=False, **kwargs)


CPU_PLAN = plan_training("cpu", True, True, CONFIG.batch_size)


def test_loader_workers_feed_the_same_batches(tiny50, plain, tmp_path, monkeypatch):
    result = _fit_with(dataclasses.replace(CPU_PLAN, loader_workers=2), tiny50, tmp_path / "run", monkeypatch)
    assert _history(result) == _history(plain), "forked workers load the same slices in the same order"


def test_the_tuned_layout_computes_what_the_plain_path_computes(tiny50, plain, tmp_path, monkeypatch):
    before = torch.backends.cudnn.benchmark
    tuned = dataclasses.replace(CPU_PLAN, channels_last=True, cudnn_benchmark=True, fused_adam=True,
                                validation_batch=CONFIG.batch_size * VALIDATION_BATCH_FACTOR)
    result = _fit_with(tuned, tiny50, tmp_path / "run", monkeypatch)
    assert torch.backends.cudnn.benchmark == before, "cuDNN's autotuning is set for the call only"
    assert [loss for loss, _ in _history(result)] == pytest.approx([loss for loss, _ in _history(plain)], rel=1e-4)
    assert [dice for _, dice in _history(result)] == pytest.approx([dice for _, dice in _history(plain)], abs=1e-3)
    ours, theirs = (load_checkpoint(path / "last.pt")["model"] for path in (tmp_path / "run", plain.run_dir))
    assert ours.keys() == theirs.keys()
    torch.manual_seed(CONFIG.seed)
    start = build_model(CONFIG.model, encoder_weights=None, width=CONFIG.unet_width).state_dict()
    flat = lambda state: torch.cat([value.flatten().double() for value in state.values() if value.is_floating_point()])  # noqa: E731
    # Adam moves every weight by about lr per step whatever its gradient's size, so a rounding
    # difference in a gradient near 0 can move a weight the other way: the two runs' weights are
    # compared as a whole, against how far training moved them (1.3 % of it, measured)
    assert float((flat(ours) - flat(theirs)).norm() / (flat(theirs) - flat(start)).norm()) < 0.1


def test_loss_scaling_is_saved_and_resumed(tiny50, tmp_path, monkeypatch):
    """The float16-with-scaler path of a T4, on the CPU: the scaler's state goes into last.pt and
    comes back on resume."""
    half = dataclasses.replace(CPU_PLAN, autocast=torch.float16, grad_scaler=True)
    run = tmp_path / "run"
    first = _fit_with(half, tiny50, run, monkeypatch)
    saved = load_checkpoint(run / "last.pt")["scaler"]
    assert saved["scale"] > 0 and all(0 <= row["val_dice"] <= 1 for row in first.history)
    resumed = []
    real_restore = training._restore

    def restore(path, state, model, optimizer, scaler, stopper):
        real_restore(path, state, model, optimizer, scaler, stopper)
        resumed.append(scaler.get_scale())

    monkeypatch.setattr(training, "_restore", restore)
    monkeypatch.setattr(training, "_device_plan", lambda config, device: half)
    fit(CONFIG.replace(max_epochs=3), run, data_dir=tiny50, resume=True, progress=False)
    assert resumed == [saved["scale"]]


def test_the_gpu_benchmark_runs_both_paths_end_to_end_on_the_cpu(tiny50, monkeypatch):
    """``benchmarks/gpu.py`` in its CPU smoke mode: every variant of a model trains for the same
    steps and is compared with the plain one (the figures themselves mean nothing on the CPU)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import _common
    import gpu

    written = []
    monkeypatch.setattr(_common, "write_results", lambda name, payload, machine=None: written.append((name, payload)))
    results = gpu.main(["--device", "cpu", "--data", str(tiny50), "--size", "16", "--models", "unet", "--epochs", "2",
                        "--slices-per-epoch", "16", "--skip", "1", "--matmul-size", "64", "--results-name", "smoke"])
    assert written[-1] == ("smoke", results) and results["finished"]
    assert results["settings"]["data"] == "real MosMedData"  # what tiny50 looks like: not marked as a phantom
    assert any("CPU SMOKE RUN" in note for note in results["notes"])
    unet = results["models"]["unet"]
    plain, tuned = unet["variants"]["plain"][0], unet["variants"]["tuned"][0]
    assert plain["steps_run"] == tuned["steps_run"] == 2 * 16 // 8 and plain["epochs_run"] == tuned["epochs_run"] == 2
    assert plain["plan"] == tuned["plan"] and plain["plan"]["autocast"] == "float32"
    assert plain["val_dice_per_epoch"] == tuned["val_dice_per_epoch"], "on the CPU both variants train the same plan"
    assert plain["train_images_per_s"] > 0 and tuned["train_images_per_s"] > 0
    assert unet["against_plain"]["tuned"]["val_dice_difference"] == [0.0]
    assert unet["predict_s_per_study"]["studies"] == len(get_split("thesis").val)
