"""Image files in class sub-folders (``CLASS/IMAGE.png``, in a folder or a tar) decoded into uint8 arrays.

Decoding tens of thousands of small images takes longer than a short run, so the arrays are cached as ``.npz``
under the dyntie cache, keyed by the source's path, size and modification times and the decoding settings.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

from dyntie_cli.errors import DyntieError

from .common import atomic_write, default_cache_dir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: bump when decoding changes, so stale cached arrays are not reused
_DECODE_RECIPE = "image-npz-v1"


def decode_class_images(
    source: Path, image_size: int, mode: str, classes: list[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A folder of class sub-folders or a tar of them, decoded: uint8 images ``[N, C, H, W]`` in ``mode`` (resized
    to ``image_size`` unless 0), int64 labels, and the class names the labels index (cached by content stamp).

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
                    return z["images"], z["labels"], found
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
    return images, labels, classes


def _save_npz(path: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    with path.open("wb") as f:  # a file object, so numpy does not append a second .npz suffix
        np.savez(f, images=images, labels=labels, classes=np.asarray(classes))


def _stamp(source: Path) -> str:
    """Size and mtime of the source (every file of a folder): a changed dataset is decoded again."""
    files = [source] if source.is_file() else sorted(_files_below(source))
    return hashlib.sha256(
        "".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files).encode()
    ).hexdigest()


def _files_below(folder: Path) -> Iterator[Path]:
    # linked folders are followed, as torchvision's folder reader follows them
    for root, _, names in os.walk(folder, followlinks=True):
        yield from (p for p in (Path(root) / name for name in names) if p.is_file())


def _folder_items(folder: Path) -> Iterator[tuple[str, str, Callable[[], bytes]]]:
    """Images in class sub-folders (``CLASS/**/IMAGE.png``), found by torchvision's ``DatasetFolder``."""
    from torchvision.datasets import DatasetFolder

    try:
        # allow_empty: an empty class folder is no class here, rather than an error
        found = DatasetFolder(str(folder), loader=_read_file, is_valid_file=_is_image_file, allow_empty=True)
    except FileNotFoundError:  # no class folders: the caller says what is missing
        return
    # torchvision lists a folder's files before its sub-folders'; path order is the order dyntie has always
    # decoded in, which the seeded splits and a cached decode depend on
    for path, target in sorted(found.samples, key=lambda sample: Path(sample[0])):
        yield found.classes[target], path, partial(found.loader, path)


def _is_image_file(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(path)


def _read_file(path: str) -> bytes:
    return Path(path).read_bytes()


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
