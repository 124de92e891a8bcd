"""Frame encoders: Hugging Face vision models mapping ``[B, 3, S, S]`` pixels to ``[B, D]``.

Names understood by :func:`load_backbone`:

- ``vit-b16``: AVT-b's frame encoder, ViT-B/16 at 224 px, 768-d [CLS] (needs ``weights``);
- ``vit-small``: ViT-S/16 at 224 px, 384-d; ``vit-tiny``: a 32 px, 32-d ViT for tests and demos;
- ``hf:/path/to/dir``: any local Hugging Face vision checkpoint whose ``model_type`` is in
  :data:`FAMILIES` (ViT, DINOv2, CLIP vision, SigLIP vision).

``weights`` is a timm-format ``.pth``/``.safetensors`` state dict (``vit_base_patch16_224``
naming, converted here), a state dict in Hugging Face naming, or a Hugging Face checkpoint
directory. ``.pth`` files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdstore.errors import ConfigError, DependencyError

from .preprocess import Preprocess

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Family:
    """How to run one ``config.model_type``: model class, feature and default preprocessing."""

    model_class: str  # a transformers class name
    feature: str  # "cls": last_hidden_state[:, 0]; "pooled": pooler_output
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_ratio: float = 1.0  # shorter side before the crop, as a multiple of the crop
    kwargs: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "vit": Family("ViTModel", "cls", HALF, HALF, kwargs={"add_pooling_layer": False}),
    "dinov2": Family("Dinov2Model", "pooled", IMAGENET_MEAN, IMAGENET_STD, resize_ratio=256 / 224),
    "clip": Family("CLIPVisionModel", "pooled", CLIP_MEAN, CLIP_STD),
    "clip_vision_model": Family("CLIPVisionModel", "pooled", CLIP_MEAN, CLIP_STD),
    "siglip": Family("SiglipVisionModel", "pooled", HALF, HALF),
    "siglip_vision_model": Family("SiglipVisionModel", "pooled", HALF, HALF),
}
CLIP_MODELS = ("videomae", "vivit", "timesformer", "xclip")  # clip-level models: no per-frame feature

# timm ViTs use LayerNorm eps 1e-6 and exact GELU, mean/std 0.5 at 224 px.
_VIT = dict(layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, num_channels=3)
PRESETS: dict[str, dict] = {
    "vit-tiny": dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **_VIT),
    "vit-small": dict(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, **_VIT),
    "vit-b16": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, **_VIT),
}
NEEDS_WEIGHTS = ("vit-b16",)  # presets meant for real features only


@dataclass
class Backbone:
    """A frame encoder with its preprocessing; call it on ``[B, 3, S, S]`` pixels."""

    name: str
    model: torch.nn.Module
    dim: int
    feature: str
    preprocess: Preprocess
    info: dict  # what the feature set records about the encoder

    def to(self, device: torch.device | str) -> "Backbone":
        self.model.to(device)
        return self

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, D] features."""
        out = self.model(pixel_values=pixels)
        return out.last_hidden_state[:, 0] if self.feature == "cls" else out.pooler_output  # [B, D]


# ---------------------------------------------------------------------------------------
# timm -> Hugging Face names


_TIMM_RENAMES = [
    (r"cls_token", "embeddings.cls_token"),
    (r"pos_embed", "embeddings.position_embeddings"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layer.\1.layernorm_before.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layer.\1.layernorm_after.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"encoder.layer.\1.intermediate.dense.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"encoder.layer.\1.output.dense.\2"),
    (r"norm\.(weight|bias)", r"layernorm.\1"),
]
_TIMM_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
_TIMM_DROPPED = re.compile(r"(head|pre_logits)\..*")  # the classifier is not part of the encoder


def is_timm_vit(state: dict) -> bool:
    """Whether a state dict uses timm's ViT naming."""
    return any(k.startswith(("blocks.", "patch_embed.")) for k in state)


def timm_to_hf(state: dict[str, torch.Tensor], where: Path | str = "checkpoint") -> tuple[dict, dict]:
    """Rename a timm ``vit_*`` state dict to Hugging Face ``ViTModel`` names.

    Returns (HF state dict, HF name -> timm name). The fused ``attn.qkv`` [3D, D] is split
    into query, key and value; the classifier head is dropped.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        if m := _TIMM_QKV.fullmatch(key):
            layer, kind = m.groups()
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):  # 3 x [D, D] or [D]
                name = f"encoder.layer.{layer}.attention.attention.{part}.{kind}"
                out[name], origin[name] = chunk.contiguous(), key
            continue
        if _TIMM_DROPPED.fullmatch(key):
            continue
        for pattern, target in _TIMM_RENAMES:
            if re.fullmatch(pattern, key):
                name = re.sub(pattern, target, key)
                out[name], origin[name] = value, key
                break
        else:
            raise ConfigError(f"{where}: unrecognised timm ViT parameter {key!r} (only plain [CLS]-token ViTs convert)")
    return out, origin


# ---------------------------------------------------------------------------------------
# Loading


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin`` (``weights_only=True``)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many kinds on a bad file
        raise ConfigError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    for wrapper in ("model", "state_dict", "module"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report and progress bars while loading."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _model_class(family: Family):
    import transformers

    return getattr(transformers, family.model_class)


def _check_loading(info: dict, source: Path, name: str, origin: dict[str, str]) -> None:
    """ConfigError for a checkpoint whose parameters do not fit the backbone."""
    if info.get("mismatched_keys"):
        key, found, expected = sorted(info["mismatched_keys"], key=lambda m: m[0])[0]
        named = f"{origin[key]} ({key})" if key in origin else key
        raise ConfigError(
            f"{source}: parameter {named} has shape {list(found)}, backbone {name} expects {list(expected)}"
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConfigError(f"{source}: checkpoint lacks parameter {missing[0]}{more} that backbone {name} needs")


def _load(family: Family, config, name: str, weights: Path | None, random_init: bool, seed: int) -> torch.nn.Module:
    cls = _model_class(family)
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # every rank of a distributed run builds the same weights
            return cls(config, **family.kwargs).eval()
    assert weights is not None
    origin: dict[str, str] = {}
    kwargs = dict(config=config, output_loading_info=True, ignore_mismatched_sizes=True, dtype=torch.float32, **family.kwargs)
    with _quiet_transformers():
        if weights.is_dir():
            model, info = cls.from_pretrained(str(weights), local_files_only=True, **kwargs)
        else:
            state = read_state_dict(weights)
            if is_timm_vit(state):
                state, origin = timm_to_hf(state, weights)
            model, info = cls.from_pretrained(None, state_dict=state, **kwargs)
    _check_loading(info, weights, name, origin)
    return model.eval()


def _hf_preprocessing(directory: Path, config, family: Family, resize: int | None) -> Preprocess:
    """Crop size, resize and mean/std from ``preprocessor_config.json`` or the family's defaults."""
    import json

    crop = int(config.image_size)
    mean, std, short = family.mean, family.std, round(crop * family.resize_ratio)
    pp = directory / "preprocessor_config.json"
    if pp.is_file():
        p = json.loads(pp.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
        size, crop_size = p.get("size") or {}, p.get("crop_size") or {}
        if p.get("do_center_crop") and isinstance(crop_size, dict) and "height" in crop_size:
            crop = int(crop_size["height"])
        short = int(size.get("shortest_edge", size.get("height", crop))) if isinstance(size, dict) else crop
    return Preprocess(crop=crop, resize=max(crop, resize or short), mean=mean, std=std)


def load_backbone(
    name: str, weights: str | Path | None = None, random_init: bool = False, seed: int = 0, resize: int | None = None
) -> Backbone:
    """Build the frame encoder ``name`` (see the module doc) with its preprocessing.

    ``random_init`` builds the architecture with seeded random weights (tests, demos);
    ``resize`` overrides the shorter side before the center crop.
    """
    try:
        import transformers
    except ImportError:
        raise DependencyError("transformers is needed for video backbones: pip install transformers") from None
    weights = Path(weights) if weights is not None else None
    if weights is not None and random_init:
        raise ConfigError("give either --weights or --random-init, not both")
    if name in PRESETS:
        family = FAMILIES["vit"]
        config = transformers.ViTConfig(**PRESETS[name])
        if weights is None and not random_init:
            hint = "a timm vit_base_patch16_224 .pth/.safetensors or a HF ViT directory" if name in NEEDS_WEIGHTS else "weights"
            raise ConfigError(f"backbone {name} needs --weights ({hint}) or --random-init")
        preprocess = Preprocess(crop=config.image_size, resize=max(config.image_size, resize or config.image_size), mean=HALF, std=HALF)
    elif name.startswith("hf:"):
        directory = Path(name[3:])
        if not (directory / "config.json").is_file():
            raise ConfigError(f"{directory}: not a Hugging Face checkpoint directory (no config.json)")
        model_type = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True).model_type
        if model_type in CLIP_MODELS:
            raise ConfigError(f"{directory}: {model_type} encodes clips, not frames; per-frame features need one of {', '.join(FAMILIES)}")
        if model_type not in FAMILIES:
            raise ConfigError(f"{directory}: model_type {model_type!r} is not a known frame encoder ({', '.join(FAMILIES)})")
        family = FAMILIES[model_type]
        config = _model_class(family).config_class.from_pretrained(str(directory), local_files_only=True)
        weights = weights or (None if random_init else directory)
        preprocess = _hf_preprocessing(directory, config, family, resize)
    else:
        raise ConfigError(f"unknown backbone {name!r}: use {', '.join(PRESETS)} or hf:/path/to/checkpoint")
    model = _load(family, config, name, weights, random_init, seed)
    info = {
        "backbone": name,
        "weights": str(weights) if weights else None,
        "random_init": random_init,
        "seed": seed if random_init else None,
        "feature": family.feature,
        "preprocess": preprocess.as_dict(),
    }
    return Backbone(name, model, int(config.hidden_size), family.feature, preprocess, info)
