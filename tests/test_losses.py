"""Tests for covidseg.losses, with golden values computed by hand.

Probabilities are set through logits: sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4.
smp's binary Dice pools the batch: dice = 2 * sum(p * t) / (sum(p) + sum(t)), loss = 1 - dice.
"""

import math

import pytest
import torch

from covidseg.losses import LOSS_NAMES, BCEDiceLoss, build_loss

LN3 = math.log(3.0)


def image(rows):
    """A (1, 1, H, W) float tensor from nested lists."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


# probabilities [[3/4, 1/4], [1/2, 1/2]] against target [[1, 0], [1, 0]]
LOGITS = image([[LN3, -LN3], [0.0, 0.0]])
TARGET = image([[1.0, 0.0], [1.0, 0.0]])
# sum(p*t) = 3/4 + 1/2 = 5/4, sum(p) = 2, sum(t) = 2: dice = (5/2) / 4 = 5/8
DICE_LOSS = 1 - 5 / 8
# BCE: -ln(3/4) twice (p=3/4 with t=1, p=1/4 with t=0), ln 2 twice: mean = ln(8/3) / 2
BCE = (2 * math.log(4 / 3) + 2 * math.log(2)) / 4


def test_dice_golden_value():
    loss = build_loss("dice")(LOGITS, TARGET)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(DICE_LOSS, abs=1e-6)


def test_dice_pools_the_batch():
    # an empty slice predicted at p = 1/2 adds sum(p) = 2 to the denominator of the batch's
    # single Dice: 2 * (5/4) / (2 + 2 + 2) = 5/12 (a mean of per-slice losses would give 3/16)
    logits = torch.cat([LOGITS, image([[0.0, 0.0], [0.0, 0.0]])])
    target = torch.cat([TARGET, torch.zeros_like(TARGET)])
    assert build_loss("dice")(logits, target).item() == pytest.approx(1 - 5 / 12, abs=1e-6)


def test_dice_of_a_perfect_prediction_is_about_zero():
    target = image([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    logits = (2 * target - 1) * 30.0  # p within 1e-13 of the target
    assert build_loss("dice")(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_of_a_batch_without_lesions_is_zero_and_bce_dice_is_bce():
    logits = image([[3.0, -1.0], [0.5, 2.0]]).requires_grad_()
    target = torch.zeros_like(logits)
    dice = build_loss("dice")(logits, target)
    assert dice.item() == 0.0
    expected_bce = sum(math.log1p(math.exp(x)) for x in (3.0, -1.0, 0.5, 2.0)) / 4  # -ln(1 - p)
    assert build_loss("bce-dice")(logits, target).item() == pytest.approx(expected_bce, rel=1e-6)


def test_bce_dice_golden_value_is_the_sum():
    assert BCE == pytest.approx(math.log(8 / 3) / 2)
    loss = build_loss("bce-dice")
    assert isinstance(loss, BCEDiceLoss)
    assert loss(LOGITS, TARGET).item() == pytest.approx(BCE + DICE_LOSS, abs=1e-6)
    assert loss(LOGITS, TARGET).item() == pytest.approx(
        (loss.bce(LOGITS, TARGET) + loss.dice(LOGITS, TARGET)).item(), abs=1e-7)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_losses_give_gradients(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.7).float()
    build_loss(name)(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_bce_dice_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        build_loss("bce-dice")(LOGITS, TARGET[..., 0])


def test_wrong_name_lists_the_valid_names():
    with pytest.raises(ValueError) as info:
        build_loss("focal")
    assert all(name in str(info.value) for name in LOSS_NAMES)
