"""Training augmentation for image batches, every random draw taken from the loop's ``torch.Generator``: one
seed fixes the whole augmented stream, so a run is reproducible and a resumed run continues it exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """Training augmentation: a random translation by up to ``shift`` of the image side (pad, then crop back),
    and a horizontal flip where a mirrored image is still the same class (not for digits)."""

    shift: float
    flip: bool

    def pad(self, size: int) -> int:
        return max(1, round(size * self.shift))

    def describe(self, size: int) -> str:
        return f"random translation up to {self.pad(size)} px" + (" + horizontal flip" if self.flip else "")


def augment_batch(images: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Pad with zeros (the background of digits and MNIST; black for photos, as torchvision's RandomCrop),
    crop each image back at a random offset, and flip a random half when ``augment.flip``."""
    b, c, h, w = images.shape
    device = generator.device
    p = augment.pad(min(h, w))
    offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator, device=device).cpu()
    padded = F.pad(images, (p, p, p, p))
    rows = offsets[0][:, None] + torch.arange(h)  # [B, H]
    cols = offsets[1][:, None] + torch.arange(w)  # [B, W]
    out = padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    if augment.flip:
        flip = (torch.rand(b, generator=generator, device=device) < 0.5).cpu()
        out[flip] = out[flip].flip(-1)
    return out
