"""The ViT backbone and its image data: datasets and their files, seeded splits, augmentation, the reward."""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets.cifar

from dyntie_cli.backbones.image_augment import Augment, augment_batch
from dyntie_cli.backbones.image_data import ImageData, complete_splits, load_image_data
from dyntie_cli.backbones.image_datasets import Split
from dyntie_cli.backbones.vit import PRESETS, ViTBackbone, auto_patch_size
from dyntie_cli.errors import DyntieError
from dyntie_cli.settings import resolve, revised
from tests.conftest import SHARED, invoke
from tests.conftest import rows as _rows


def _load(dataset: str, data_dir=None, image_size: int = 0, augment: bool = True) -> ImageData:
    return load_image_data(
        dataset, data_dir=data_dir, image_size=image_size, batch_size=8, eval_batch_size=16, augment=augment
    )


# -- digits: shipped, offline --------------------------------------------------------------------------


def test_train_vit_on_digits_runs_offline_without_data_dir(runner, tmp_path):
    db = tmp_path / "r.duckdb"
    result = invoke(
        runner,
        "train",
        "vit",
        "--preset",
        "vit-tiny",
        "--dataset",
        "digits",
        "--db",
        db,
        "--out",
        tmp_path / "runs",
        "--max-steps",
        6,
        "--decide-every",
        2,
    )
    assert result.exit_code == 0, result.stderr or result.output
    assert "packaged copy" in " ".join(result.stderr.split())
    assert "final test: loss=" in result.stdout and "accuracy=" in result.stdout
    assert _rows(db, "SELECT test_split, dataset FROM runs")[0] == ("test", "digits")
    (accuracy,) = _rows(db, "SELECT value FROM metrics WHERE split = 'test' AND name = 'accuracy'")[0]
    assert 0.0 <= accuracy <= 1.0


def test_digits_splits_are_carved_with_a_fixed_seed():
    data = _load("digits")
    sizes = [len(data.splits[s]) for s in ("train", "validation", "test")]
    assert sizes == [1258, 180, 359] and sum(sizes) == 1797
    assert data.splits["train"].images.shape[1:] == (1, 8, 8) and data.num_classes == 10
    assert data.splits["train"].images.max() == 255  # 0..16 counts spread over 0..255
    again = _load("digits")
    assert torch.equal(again.splits["test"].images, data.splits["test"].images)
    assert "seed 0" in data.source and "translation up to 1 px" in data.source and "flip" not in data.source


def test_complete_splits_never_overlap_and_keep_an_official_test_split():
    pool = Split(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), torch.arange(100))  # labels double as ids
    carved, note = complete_splits({"train": pool})
    ids = {role: set(split.labels.tolist()) for role, split in carved.items()}
    assert [len(ids[r]) for r in ("train", "validation", "test")] == [70, 10, 20]
    assert not (
        ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"]
    )
    test = Split(torch.zeros(30, 1, 2, 2, dtype=torch.uint8), torch.arange(100, 130))
    carved, note = complete_splits({"train": pool, "test": test})
    assert carved["test"] is test and len(carved["validation"]) == 10 and len(carved["train"]) == 90
    assert "validation 10" in note and "test" not in note


# -- augmentation ---------------------------------------------------------------------------------------


def test_augmentation_follows_the_generator():
    data = _load("digits")
    first = data.train_batch(torch.Generator().manual_seed(5))
    again = data.train_batch(torch.Generator().manual_seed(5))
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and torch.equal(
        first["labels"], again["labels"]
    )
    assert set(first) == {"pixel_values", "labels"} and first["pixel_values"].dtype == torch.float32
    plain = _load("digits", augment=False)
    batch = plain.train_batch(torch.Generator().manual_seed(5))
    assert torch.equal(batch["labels"], first["labels"])  # same draw of images ...
    assert not torch.equal(batch["pixel_values"], first["pixel_values"])  # ... moved by the augmentation


def test_translation_moves_content_by_at_most_the_pad_and_never_mirrors():
    image = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    image[0, 0, 3, 2] = 200  # one bright pixel, left of centre
    images = image.repeat(400, 1, 1, 1)
    out = augment_batch(images, Augment(shift=1 / 8, flip=False), torch.Generator().manual_seed(0))
    where = out.flatten(1).argmax(1)
    rows, cols = where // 8, where % 8
    assert set(rows.tolist()) == {2, 3, 4} and set(cols.tolist()) == {1, 2, 3}  # +-1 px, no mirror to col 5
    assert (out.flatten(1).sum(1) == 200).all()  # nothing lost or duplicated


def test_photos_are_flipped_about_half_the_time():
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    image[..., 16, 4] = 255  # far left: a flip sends it to the right half
    out = augment_batch(
        image.repeat(200, 1, 1, 1), Augment(shift=1 / 8, flip=True), torch.Generator().manual_seed(1)
    )
    right = (out[:, 0].flatten(1).argmax(1) % 32 >= 16).float().mean()
    assert 0.35 < float(right) < 0.65


# -- MNIST, CIFAR-10 and image folders from files ---------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    dims = array.ndim
    header = struct.pack(">I", 0x800 + dims) + struct.pack(f">{dims}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _mnist_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10


def test_mnist_t10k_only_is_carved_into_all_three_splits(tmp_path):
    images, labels = _mnist_like(50, 0)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    data = _load("mnist", tmp_path)
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [35, 5, 10]
    assert "t10k only" in data.source and data.splits["test"].images.shape[1:] == (1, 28, 28)
    pool = {bytes(im) for im in images}
    assert all(bytes(im[0].numpy()) in pool for im in data.splits["test"].images)


def test_mnist_with_train_keeps_t10k_as_the_test_split(tmp_path):
    for prefix, seed in (("train", 1), ("t10k", 2)):
        images, labels = _mnist_like(40 if prefix == "train" else 20, seed)
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    data = _load("mnist", tmp_path)
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [36, 4, 20]
    official = {bytes(im) for im in _mnist_like(20, 2)[0]}
    assert {bytes(im[0].numpy()) for im in data.splits["test"].images} == official


def test_mnist_csv_and_missing_files(tmp_path):
    images, labels = _mnist_like(30, 3)
    rows = np.concatenate([images.reshape(30, -1), labels[:, None]], axis=1)
    text = "\n".join(",".join(map(str, r)) for r in rows)
    (tmp_path / "mnist_5k.csv.gz").write_bytes(gzip.compress(text.encode()))
    data = _load("mnist", tmp_path)
    assert sum(len(data.splits[s]) for s in ("train", "validation", "test")) == 30
    with pytest.raises(DyntieError, match="holds no MNIST files"):
        _load("mnist", tmp_path / "..")
    with pytest.raises(DyntieError, match="--data-dir"):
        _load("mnist")  # offline (conftest sets HF_HUB_OFFLINE) and nothing local
    with pytest.raises(DyntieError, match="--data-dir"):
        _load("cifar10")


def _png(color: tuple[int, int, int], size: int = 8) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _class_tar(path: Path, split: str, per_class: int) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for cls, color in (("dog", (0, 0, 200)), ("cat", (200, 0, 0))):  # not in name order
            for i in range(per_class):
                data = _png(color)
                info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_cifar_style_tars_of_class_folders_are_decoded_and_cached(tmp_path, dyntie_cache):
    _class_tar(tmp_path / "toy_train_jpg.tar.gz", "train", 10)
    _class_tar(tmp_path / "toy_test_jpg.tar.gz", "test", 3)
    data = _load("cifar10", tmp_path)
    assert data.classes == ["cat", "dog"] and [
        len(data.splits[s]) for s in ("train", "validation", "test")
    ] == [18, 2, 6]
    assert data.splits["test"].images.shape[1:] == (3, 8, 8)
    cat = data.splits["test"].images[data.splits["test"].labels == 0]
    assert (cat[:, 0] == 200).all() and (cat[:, 2] == 0).all()  # class from the folder, channels in order
    assert data.augment is not None and data.augment.flip
    labels = data.splits["test"].labels.tolist()
    assert labels != sorted(labels)  # a seeded shuffle: a budgeted evaluation must not see one class only
    cached = list((dyntie_cache / "images").glob("*.npz"))
    assert len(cached) >= 2
    again = _load("cifar10", tmp_path)
    assert torch.equal(again.splits["test"].images, data.splits["test"].images)


def _cifar_batches(folder: Path, per_batch: int) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """Files in the layout of cifar-10-batches-py, with random pixels in the files' CHW row layout."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    data, labels = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data[name] = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels[name] = [int(v) for v in rng.integers(0, 10, per_batch)]
        (folder / name).write_bytes(pickle.dumps({"data": data[name], "labels": labels[name]}, protocol=2))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return data, labels


def test_cifar10_python_batches_are_read_by_torchvision_and_checked(tmp_path, monkeypatch):
    data, labels = _cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=6)
    # files that are not the published ones are refused: torchvision checks their md5 sums
    with pytest.raises(DyntieError, match="md5 sums"):
        _load("cifar10", tmp_path)
    # past that check (which these random files cannot pass), the images are the files' bytes in CHW
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the folder above the batches, or theirs
        loaded = _load("cifar10", data_dir, augment=False)
        assert loaded.classes[:2] == ["airplane", "automobile"] and len(loaded.splits["test"]) == 6
        test = {bytes(im.numpy()): int(y) for im, y in zip(loaded.splits["test"].images, loaded.splits["test"].labels)}
        assert test == {bytes(row.reshape(3, 32, 32)): y for row, y in zip(data["test_batch"], labels["test_batch"])}
        assert sum(len(loaded.splits[s]) for s in ("train", "validation")) == 30


def test_class_folders_are_decoded_in_path_order(tmp_path, dyntie_cache):
    from dyntie_cli.backbones.image_files import decode_class_images

    shades = {"cat/b.png": 10, "cat/a/x.png": 20, "cat/a.png": 30, "cat/a/b/y.gif": 40, "dog/z.png": 50}
    for name, shade in shades.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png((shade, shade, shade)))
    (tmp_path / "empty").mkdir()  # no images: no class
    (tmp_path / "stray.png").write_bytes(_png((0, 0, 0)))  # not in a class folder: not an image of the set
    images, labels, classes = decode_class_images(tmp_path, 0, "RGB", None)
    # a sub-folder sorts where its name does (cat/a/ before cat/a.png), not after the folder's own files
    assert images[:, 0, 0, 0].tolist() == [40, 20, 30, 10, 50]
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 0, 0, 0, 1]


def test_imagefolder_flat_classes_resizing_and_mixed_sizes(tmp_path):
    for cls, color in (("a", (255, 255, 255)), ("b", (0, 0, 0))):
        (tmp_path / cls).mkdir()
        for i in range(10):
            (tmp_path / cls / f"{i}.png").write_bytes(_png(color, size=8 if i else 12))
    with pytest.raises(DyntieError, match="data.image_size"):
        _load(f"imagefolder:{tmp_path}")
    data = _load(f"imagefolder:{tmp_path}", image_size=16)
    assert data.splits["train"].images.shape[1:] == (3, 16, 16) and data.classes == ["a", "b"]
    assert sum(len(data.splits[s]) for s in ("train", "validation", "test")) == 20


@pytest.mark.skipif(not (SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file(), reason="../shared absent")
def test_real_mnist_t10k_files():
    data = _load("mnist", SHARED / "mnist")
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [7000, 1000, 2000]
    counts = torch.bincount(data.splits["train"].labels, minlength=10)
    assert (counts > 500).all()  # every digit is present in train


# -- the model ------------------------------------------------------------------------------------------


def _vit(dataset: str = "digits"):
    backbone = ViTBackbone()
    p = PRESETS["vit-tiny"]
    cfg = resolve(ViTBackbone, p, dataset=dataset)
    data = backbone.load_data(cfg)
    torch.manual_seed(0)
    return backbone, backbone.build_model(cfg, data).eval(), data, cfg


def test_model_shape_patches_and_blocks():
    backbone, model, data, cfg = _vit()
    assert backbone.blocks(model) == list(model.blocks) and len(model.blocks) == 4
    assert model.patch_embed.patch_size == (4, 4) and model.head.out_features == 10
    assert [auto_patch_size(s) for s in (8, 28, 32, 224)] == [4, 4, 4, 16]
    with pytest.raises(DyntieError, match="model.patch_size"):
        backbone.build_model(revised(cfg, [("model.patch_size", 3)]), data)
    depth = {name: p.model["depth"] for name, p in PRESETS.items()}
    assert depth == {"vit-tiny": 4, "vit-cpu": 12, "vit-paper": 32}


def test_vit_reward_is_exp_cross_entropy_and_evaluate_reports_accuracy():
    backbone, model, data, _ = _vit()
    batch = data.train_batch(torch.Generator().manual_seed(0))
    with torch.no_grad():
        ce = F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
    assert backbone.reward_ppl(model, batch) == pytest.approx(math.exp(float(ce)), rel=1e-5)
    out = backbone.evaluate(model, data.eval_batches("validation"))
    assert set(out) == {"loss", "ppl", "accuracy"} and out["ppl"] == pytest.approx(math.exp(out["loss"]))
    assert sum(len(b["labels"]) for b in data.eval_batches("test", 50)) == 50
