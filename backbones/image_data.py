"""Image batches: the ViT backbone's data entry point, seeded splits and the normalised batches it trains on.

``load_image_data`` is the one entry point the ViT backbone calls. It reads a dataset (``image_datasets``:
digits, MNIST, CIFAR-10 or an image folder, decoded once into a uint8 tensor ``[N, C, H, W]`` per split),
carves the splits a source lacks out of train with a fixed seed (validation 10% of train; test 20% where there
is no test split at all; ``source`` says exactly how), and serves them through ``ImageData``: random training
batches augmented (``image_augment``) with the loop's ``torch.Generator``, so a run is reproducible and
resumable, deterministic evaluation batches, and per-channel normalisation from train statistics.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dyntie_cli.backbone import Batch
from dyntie_cli.errors import DyntieError, UsageError

from .common import carve
from .image_augment import Augment, augment_batch
from .image_datasets import Split, load_image_source

SPLITS = ("train", "validation", "test")
#: the carved splits are the same images whatever the run's --seed, so numbers compare across seeds
SPLIT_SEED = 0
VAL_FRACTION = 0.10
TEST_FRACTION = 0.20


def complete_splits(splits: dict[str, Split], seed: int = SPLIT_SEED) -> tuple[dict[str, Split], str]:
    """Carve what is missing out of train with one seeded permutation: test (20%) if there is no test split,
    then validation (10%). Carved splits never overlap train or each other."""
    missing = [role for role in ("test", "validation") if role not in splits]
    if not missing:
        return dict(splits), ""
    train = splits["train"]
    n = len(train)
    fractions = {"test": TEST_FRACTION, "validation": VAL_FRACTION}
    sizes = [(role, max(1, round(n * fractions[role]))) for role in missing]
    rest, roles = carve(n, sizes, seed=seed, too_few=(
        f"The training split has only {n} images, too few to carve {' and '.join(missing)} from."))
    out = dict(splits)
    for role, index in roles.items():
        out[role] = train.take(torch.from_numpy(index))
    out["train"] = train.take(torch.from_numpy(rest))
    notes = [f"{role} {size:,}" for role, size in sizes]
    return out, f"carved from train with seed {seed}: {', '.join(notes)} (train keeps {len(rest):,})"


class ImageData:
    """Uint8 image tensors per split served as normalised float batches (implements ``TaskData``)."""

    test_split = "test"

    def __init__(
        self,
        splits: dict[str, Split],
        classes: list[str],
        *,
        batch_size: int,
        eval_batch_size: int,
        augment: Augment | None,
        source: str,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise UsageError(f"data.{name} must be at least 1, not {value}: set a positive value.")
        self.splits = splits
        self.classes = classes
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.augment = augment
        self.source = source
        train = splits["train"].images.float() / 255
        # per-channel statistics of train only, so nothing about the evaluation images leaks into the inputs
        self.mean = train.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
        self.std = train.std(dim=(0, 2, 3)).clamp_min(1e-3).view(1, -1, 1, 1)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.splits["train"].images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.splits["train"].images.shape[-1])

    def items_per_batch(self) -> int:
        return self.batch_size

    def train_batch(self, generator: torch.Generator) -> Batch:
        """Uniform draws; indices and augmentation both come from ``generator``, one seed fixes both."""
        train = self.splits["train"]
        index = torch.randint(
            len(train), (self.batch_size,), generator=generator, device=generator.device
        ).cpu()
        images = train.images[index]
        if self.augment is not None:
            images = augment_batch(images, self.augment, generator)
        return {"pixel_values": self._normalise(images), "labels": train.labels[index]}

    def eval_batches(self, split: str, max_items: int | None = None) -> Iterator[Batch]:
        """The first ``max_items`` images of ``split`` in order, unaugmented."""
        data = self.splits[split]
        n = len(data) if max_items is None else min(len(data), max(max_items, 0))
        for start in range(0, n, self.eval_batch_size):
            stop = min(start + self.eval_batch_size, n)
            yield {
                "pixel_values": self._normalise(data.images[start:stop]),
                "labels": data.labels[start:stop],
            }

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - self.mean) / self.std


def in_seeded_order(split: Split, seed: int = SPLIT_SEED) -> Split:
    """The split in a fixed random order. Folders and tars list images class by class, so without this a
    budgeted evaluation (``eval_items``/``test_items``) would score the first classes only."""
    return split.take(np.random.default_rng(seed).permutation(len(split)))


def resize(split: Split, size: int) -> Split:
    if split.images.shape[-1] == size and split.images.shape[-2] == size:
        return split
    x = F.interpolate(
        split.images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return Split(x.round().clamp(0, 255).to(torch.uint8), split.labels)


def load_image_data(
    dataset: str,
    *,
    data_dir: str | os.PathLike[str] | None,
    image_size: int,
    batch_size: int,
    eval_batch_size: int,
    augment: bool = True,
) -> ImageData:
    """Dataset -> splits (carved where missing) -> ``ImageData``: the entry point of the ViT backbone."""
    if image_size < 0:
        raise UsageError(f"data.image_size must be 0 (native) or a positive size, not {image_size}.")
    name = dataset.strip()
    loaded = load_image_source(dataset, data_dir, image_size)
    splits, carving = complete_splits(loaded.splits)
    splits = {role: in_seeded_order(split) for role, split in splits.items()}
    if image_size:
        splits = {role: resize(split, image_size) for role, split in splits.items()}
    _check_labels(splits, loaded.classes)
    height, width = splits["train"].images.shape[-2:]
    if height != width:
        raise DyntieError(
            f"The images are {height}x{width}, not square: set --set data.image_size=N to resize them to NxN."
        )
    shape = "x".join(str(d) for d in splits["train"].images.shape[1:])
    counts = "/".join(f"{len(splits[r]):,}" for r in SPLITS)
    notes = [loaded.origin, f"train/validation/test {counts} images of {shape}"]
    if carving:
        notes.append(carving)
    size = splits["train"].images.shape[-1]
    notes.append(f"augmentation: {loaded.augment.describe(size) if augment else 'off'}")
    return ImageData(
        {r: splits[r] for r in SPLITS},
        loaded.classes,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        augment=loaded.augment if augment else None,
        source=f"{name} ({'; '.join(notes)})",
    )


def _check_labels(splits: dict[str, Split], classes: Sequence[str]) -> None:
    for role, split in splits.items():
        if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= len(classes)):
            raise DyntieError(
                f"The {role} split has labels outside 0..{len(classes) - 1}: check the dataset files."
            )
