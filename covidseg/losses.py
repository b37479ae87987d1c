"""Training losses for binary lesion segmentation from logits: soft Dice, and BCE + Dice.

The soft Dice loss is smp's ``DiceLoss(mode="binary", from_logits=True)`` with its defaults
(``smooth=0``, ``eps=1e-7``). With ``p = sigmoid(logits)`` and a {0, 1} target ``t``, it is

    loss = 1 - 2 * sum(p * t) / max(sum(p) + sum(t), 2 * eps)

where the sums run over the whole batch and all pixels: one Dice for the batch, not a mean of
per-slice Dice values, so slices without lesions add only their false-positive mass to the
denominator. If the batch holds no lesion pixel at all, smp sets the loss to 0 (Dice is undefined
there), whatever the prediction, and it gives no gradient. ``bce-dice`` adds the mean binary
cross-entropy, which still penalises false positives on such batches (Milletari et al. 2016 for
the soft Dice loss; thesis ch. 6).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LOSS_NAMES", "BCEDiceLoss", "build_loss", "dice_loss"]

from .config import LOSS_NAMES  # noqa: E402  (their one home, importable without torch)


def dice_loss() -> nn.Module:
    """smp's soft Dice loss for one-channel logits (see the module docstring for the formula).

    Returns:
        ``segmentation_models_pytorch.losses.DiceLoss(mode="binary", from_logits=True)``.

    Shape:
        - Logits: ``(N, 1, H, W)``.
        - Target: ``(N, 1, H, W)``, float, values in {0, 1}.
        - Output: scalar.
    """
    from segmentation_models_pytorch.losses import DiceLoss

    return DiceLoss(mode="binary", from_logits=True)


class BCEDiceLoss(nn.Module):
    """Binary cross-entropy plus soft Dice, with equal weights, from logits.

    ``loss = BCEWithLogitsLoss()(logits, target) + DiceLoss(binary, from_logits)(logits, target)``;
    the BCE term is the mean over all pixels of the batch.

    Shape:
        - Logits: ``(N, 1, H, W)``.
        - Target: ``(N, 1, H, W)``, float, values in {0, 1}.
        - Output: scalar.
    """

    def __init__(self):
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss()
        self.dice = dice_loss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return BCE + Dice of ``logits`` against ``target``.

        Raises:
            ValueError: If the shapes differ.
        """
        if logits.shape != target.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
        return self.bce(logits, target) + self.dice(logits, target)


def build_loss(name: str) -> nn.Module:
    """Build a loss by name.

    Args:
        name: ``"dice"`` (soft Dice) or ``"bce-dice"`` (BCE + soft Dice); see :data:`LOSS_NAMES`.

    Returns:
        A module called as ``loss(logits, target)``, returning a scalar.

    Shape:
        - Logits: ``(N, 1, H, W)``.
        - Target: ``(N, 1, H, W)``, float, values in {0, 1}.

    Raises:
        ValueError: If ``name`` is not one of :data:`LOSS_NAMES` (the message lists them).
    """
    if name == "dice":
        return dice_loss()
    if name == "bce-dice":
        return BCEDiceLoss()
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
