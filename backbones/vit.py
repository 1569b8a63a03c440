"""ViT (timm ``VisionTransformer``, built from preset kwargs, no pretrained weights) for image classification.

Blocks are ``blocks``. The patch embedding, class token, position embedding, final norm and head always train.
``--init`` starts from timm weights: a folder with timm's ``config.json`` (``timm.models.save_for_hf``, or
``dyntie export --format full``), a checkpoint file (``.safetensors``, ``.pth``, ``.bin``: the shape is read from
its tensors, the heads from ``model.num_heads``), or a timm model name with pretrained weights when the hub is
reachable. timm's own loader adapts the head, the input channels and the position embedding to the data.
Metrics: ``loss`` (mean cross-entropy), ``ppl = exp(loss)`` and ``accuracy``. The reward is the base class's
``exp(cross-entropy)`` on a fresh training batch -- never accuracy (the reference code rewarded ViT with
negative accuracy, a signal that is flat for long stretches and blind to confidence).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dyntie_cli.backbone import Backbone, Batch, EvalStep, Preset, TaskData
from dyntie_cli.errors import DyntieError
from dyntie_cli.settings import MAX_BATCH, MAX_BLOCKS, RunSettings, Section, setting

from .common import described_model, hub_reachable, read_json_config
from .image_data import ImageData
from .image_datasets import DATASETS
from .metrics import accuracy


class ViTModel(Section):
    """The ViT shape (``--set model.KEY=VALUE``)."""

    depth: int = setting(12, "Transformer blocks.", ge=1, le=MAX_BLOCKS)
    embed_dim: int = setting(128, "Hidden width.", ge=1)
    num_heads: int = setting(4, "Attention heads (embed_dim must be a multiple).", ge=1)
    mlp_ratio: float = setting(4.0, "Feed-forward width / embed_dim.", gt=0)
    patch_size: int = setting(0, "Patch side in pixels (0: 4 px up to 64-px images, else 16).", ge=0)
    dropout: float = setting(0.0, "Dropout after the projections and attention.", ge=0, lt=1)
    drop_path: float = setting(0.0, "Stochastic depth rate.", ge=0, lt=1)


class ImageDataSettings(Section):
    """Images and batches (``--set data.KEY=VALUE``)."""

    image_size: int = setting(0, "Resize images to NxN (0: native size).", ge=0)
    batch_size: int = setting(64, "Images per training step.", ge=1, le=MAX_BATCH)
    eval_batch_size: int = setting(256, "Images per evaluation batch.", ge=1, le=MAX_BATCH)
    augment: bool = setting(True, "Random translations (and flips where a mirror keeps the class).")


# fmt: off
_DATA = dict(image_size=0, batch_size=64, eval_batch_size=256, augment=True)

PRESETS = {
    p.name: p
    for p in [
        Preset("vit-tiny", "4 x 32, 2 heads: seconds, for tests",
               model=dict(depth=4, embed_dim=32, num_heads=2, mlp_ratio=2.0, patch_size=0, dropout=0.0,
                          drop_path=0.0),
               data=dict(_DATA, batch_size=32),
               train=dict(max_steps=20, warmup_steps=4, lr=1e-3, eval_every=10, eval_items=256,
                          test_items=256, log_every=5),
               ties=dict(decide_every=5)),
        Preset("vit-cpu", "12 x 128, 4 heads, batch 64: minutes on digits or MNIST on a CPU",
               model=dict(depth=12, embed_dim=128, num_heads=4, mlp_ratio=4.0, patch_size=0, dropout=0.0,
                          drop_path=0.0),
               data=dict(_DATA),
               train=dict(max_steps=600, warmup_steps=40, lr=1e-3, eval_every=100, eval_items=0, test_items=0,
                          log_every=10),
               ties=dict(decide_every=10)),
        # The paper trains a 32-block ViT; ViT-Huge's block (1280 wide, 16 heads, MLP 5120) is the standard
        # 32-block shape. At CIFAR's native 32 px with 4-px patches (64 tokens); --set data.image_size=224
        # model.patch_size=14 gives ViT-H/14 proper.
        Preset("vit-paper", "32 x 1280, 16 heads (ViT-Huge blocks, about 630M parameters), 4-px patches: GPU",
               model=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4.0, patch_size=4, dropout=0.0,
                          drop_path=0.1),
               data=dict(_DATA, batch_size=128),
               train=dict(max_steps=20000, warmup_steps=1000, lr=1e-4, eval_every=1000, eval_items=0,
                          test_items=0, precision="bf16", log_every=20),
               ties=dict(decide_every=10)),
    ]
}
# fmt: on


def auto_patch_size(image_size: int) -> int:
    """``model.patch_size = 0``: 4 px up to 64 px images (digits 2 x 2 = 4 tokens, MNIST 49, CIFAR 64),
    else 16 px (224 px: 196 tokens, the ViT-B/16 layout).

    Not 2 px for the 8-px digits: with the 1-px translation augmentation a shift moves content across half a
    patch, and a 12 x 128 ViT then learned several times slower (37% vs 96% validation accuracy after 400
    steps, measured with both patch sizes).
    """
    return 4 if image_size <= 64 else 16


class ViTBackbone(Backbone):
    name = "vit"
    description = "Vision Transformer image classifier (timm VisionTransformer)"
    command = "train"
    presets = PRESETS
    default_preset = "vit-cpu"
    datasets = list(DATASETS)
    default_dataset = "digits"
    metric = "accuracy"
    higher_is_better = True
    model_settings = ViTModel
    data_settings = ImageDataSettings

    def load_data(self, cfg: RunSettings) -> TaskData:
        from .image_data import load_image_data

        d = cfg.data
        return load_image_data(
            cfg.dataset,
            data_dir=cfg.data_dir,
            image_size=d.image_size,
            batch_size=d.batch_size,
            eval_batch_size=d.eval_batch_size,
            augment=d.augment,
        )

    def build_model(self, cfg: RunSettings, data: TaskData) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        m = cfg.model
        args = model_args(cfg, data)
        p = m.dropout
        drops = dict(drop_rate=p, proj_drop_rate=p, attn_drop_rate=p, drop_path_rate=m.drop_path)
        if cfg.init:
            return _pretrained(cfg, args, drops)
        return VisionTransformer(**args, **drops)

    def load_model_code(self, cfg: RunSettings, data: TaskData) -> None:
        if not cfg.init:
            return super().load_model_code(cfg, data)
        import timm.models.vision_transformer  # noqa: F401 -- the code --init weights need, not the weights

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = model(batch["pixel_values"]).float()
        return F.cross_entropy(logits, batch["labels"]), batch["labels"].shape[0]

    def eval_step(self, model: nn.Module, batch: Batch) -> EvalStep:
        logits = model(batch["pixel_values"]).float()
        labels = batch["labels"]
        return EvalStep(float(F.cross_entropy(logits, labels)), labels.shape[0], logits.argmax(-1), labels)

    def task_metrics(self, model: nn.Module, predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {"accuracy": accuracy(predictions, labels)}

    # -- models in and out -------------------------------------------------------------------------

    def init_settings(self, init: str) -> dict[str, Any]:
        source = _source(init)
        return {f"model.{k}": v for k, v in source.shape.items()}

    def outputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["pixel_values"]).float()

    def export_model(self, model: nn.Module, data: TaskData, cfg: RunSettings, folder: Path) -> None:
        import timm

        images = cast(ImageData, data)
        args = model_args(cfg, data)
        # built by timm's factory (not the class), so the folder records what create_model rebuilds
        lib = timm.create_model(EXPORT_ARCH, pretrained=False, **args)
        lib.load_state_dict(model.state_dict(), strict=True)
        preprocessing = {"mean": images.mean.flatten().tolist(), "std": images.std.flatten().tolist(),
                         "interpolation": "bilinear", "crop_pct": 1.0}
        timm.models.save_for_hf(lib, str(folder), model_args=args, safe_serialization=True,
                                model_config={"label_names": list(images.classes), "pretrained_cfg": preprocessing})
        file = folder / "config.json"
        config = json.loads(file.read_text())
        # the architecture's own pretrained tag and licence describe timm's weights, not these
        config["pretrained_cfg"].pop("license", None)
        config["pretrained_cfg"]["tag"] = "dyntie"
        file.write_text(json.dumps(config, indent=2))

    def load_exported(self, folder: Path, *, weights: bool = True) -> nn.Module:
        import timm

        return timm.create_model(f"local-dir:{folder}", pretrained=weights).eval()


#: the registered timm name an export is rebuilt from; its model_args replace every shape argument, so any
#: plain ViT name would do, and this is the canonical one
EXPORT_ARCH = "vit_base_patch16_224"


def model_args(cfg: RunSettings, data: TaskData) -> dict[str, Any]:
    """The ``VisionTransformer`` arguments of a run's shape and data (drop rates apart)."""
    m = cfg.model
    images = cast(ImageData, data)
    size = images.image_size
    patch = m.patch_size or auto_patch_size(size)
    if size % patch:
        raise DyntieError(
            f"The {size}-px images do not split into {patch}-px patches: set --set model.patch_size=N "
            f"with N dividing {size} (or --set data.image_size=M)."
        )
    return dict(img_size=size, patch_size=patch, in_chans=images.channels, num_classes=images.num_classes,
                embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio)


_TIMM_SOURCE = ("a timm ViT folder (timm.models.save_for_hf, or dyntie export --format full) or checkpoint file "
                "(.safetensors, .pth, .bin)")
_SHAPE_KEYS = ("depth", "embed_dim", "num_heads", "mlp_ratio", "patch_size")


class _Source:
    """Where --init weights come from: ``name`` for timm's factory, the shape they fix, the overlay that points
    timm's loader at them (num_classes, input_size: what the weights were trained for, so timm adapts them)."""

    def __init__(self, name: str, shape: dict[str, Any], overlay: dict[str, Any] | None = None) -> None:
        self.name, self.shape, self.overlay = name, shape, overlay


def _source(init: str) -> _Source:
    path = Path(init).expanduser()
    if path.is_dir():
        raw = read_json_config(path, _TIMM_SOURCE)
        arch = str(raw.get("architecture", ""))
        if not arch.startswith("vit_"):
            raise DyntieError(f"--init {init} holds {described_model(raw)}, not a timm ViT: pass {_TIMM_SOURCE}.")
        args = raw.get("model_args", {})
        shape = {k: args[k] for k in _SHAPE_KEYS if k in args}
        return _Source(f"local-dir:{path}", shape)
    if path.is_file():
        return _file_source(path)
    import timm

    if timm.is_model(init) and hub_reachable():
        return _Source(init, {})
    raise DyntieError(f"--init {init} is no file or folder (nor a timm model name with the hub reachable): pass "
                      f"{_TIMM_SOURCE}.")


def _file_source(path: Path) -> _Source:
    """A bare checkpoint: its shape read from the tensors (heads cannot be: they stay model.num_heads)."""
    from timm.models import load_state_dict

    try:
        sd = load_state_dict(str(path))
    except Exception as exc:  # noqa: BLE001 -- torch and safetensors raise many kinds for a foreign file
        raise DyntieError(f"--init {path} is no readable checkpoint ({type(exc).__name__}): pass "
                          f"{_TIMM_SOURCE}.") from None
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "head.weight")
    if not all(k in sd for k in needed):
        raise DyntieError(f"--init {path} holds no timm ViT weights (no {next(k for k in needed if k not in sd)}): "
                          f"pass {_TIMM_SOURCE}.")
    patch = sd["patch_embed.proj.weight"]
    embed = int(patch.shape[0])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    shape = dict(depth=depth, embed_dim=embed, patch_size=int(patch.shape[-1]),
                 mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed)
    overlay = dict(file=str(path), num_classes=int(sd["head.weight"].shape[0]),
                   input_size=(int(patch.shape[1]), grid * int(patch.shape[-1]), grid * int(patch.shape[-1])))
    return _Source(EXPORT_ARCH, shape, overlay)


def _pretrained(cfg: RunSettings, args: dict[str, Any], drops: dict[str, float]) -> nn.Module:
    """A ViT of the run's shape with --init weights, through timm's loader (which adapts the head to the
    data's classes, the patch embedding to its channels and the position embedding to its size)."""
    import timm

    source = _source(cfg.init)
    for key, have in source.shape.items():
        if getattr(cfg.model, key) != have:
            what = "blocks" if key == "depth" else key
            raise DyntieError(f"The ViT weights in {cfg.init} have {have} {what} but model.{key} is "
                              f"{getattr(cfg.model, key)}: drop that override (--init weights set the model's "
                              "shape).")
    extra = {"pretrained_cfg_overlay": source.overlay} if source.overlay else {}
    try:
        return timm.create_model(source.name, pretrained=True, **args, **drops, **extra)
    except (OSError, RuntimeError, ValueError) as exc:
        raise DyntieError(f"Could not load ViT weights from {cfg.init} ({type(exc).__name__}: {exc}); pass "
                          f"{_TIMM_SOURCE}.") from exc
