"""The run card: what a result was computed on, printed beside every result.

Training (:func:`covidseg.training.fit`) and evaluation (:func:`covidseg.evaluation.evaluate_run`)
write one into their results, the book prints it with them and :mod:`covidseg.viz` stamps figures
from it, so that numbers computed on the synthetic phantom (:data:`covidseg.sources.PHANTOM`) are
never taken for the thesis'.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

from .sources import PHANTOM, data_source

__all__ = ["RunCard"]


@dataclass(frozen=True)
class RunCard:
    """What a result was computed on, printed beside every result.

    Attributes:
        data: :data:`~covidseg.sources.REAL` or :data:`~covidseg.sources.PHANTOM`.
        model: The model name.
        device: Where it ran, e.g. ``'cpu'`` or ``'cuda (NVIDIA T4)'``.
        epochs: Epochs trained.
        image_size: In-plane size the model saw.
        seconds: Wall time of the work reported.
        preset: The config preset.
    """

    data: str
    model: str
    device: str
    epochs: int
    image_size: int
    seconds: float
    preset: str = "custom"

    def __str__(self) -> str:
        warning = "  <- NOT the thesis' data: synthetic images" if self.data == PHANTOM else ""
        return (
            f"run card | data: {self.data}{warning}\n"
            f"         | model: {self.model} | preset: {self.preset} | device: {self.device}\n"
            f"         | epochs: {self.epochs} | image size: {self.image_size} px | time: {self.seconds:.1f} s"
            f" | host: {platform.machine()}"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def describe(cls, config, data_dir, device, epochs: int, seconds: float) -> RunCard:
        """The card of work done with ``config`` on ``data_dir`` on ``device`` (a ``torch.device``)."""
        from .devices import describe_device

        return cls(
            data=data_source(data_dir),
            model=config.model,
            device=describe_device(device),
            epochs=epochs,
            image_size=config.image_size,
            seconds=seconds,
            preset=config.preset,
        )
