"""attnzoo's ViTs registered with timm, so ``timm.create_model("attnzoo_vit_tiny_patch16_224", attention="gla",
num_classes=10)`` works once ``attnzoo.models`` is imported (``import attnzoo.models`` does it).

The names follow timm's: ``attnzoo_vit_{tiny,small,base}_patch16_224`` have the widths of timm's
``vit_{tiny,small,base}_patch16_224`` (Dosovitskiy et al. 2021; DeiT's tiny/small), and ``attnzoo_vit_digits_patch2_8``
is ``configs/model/vit.yaml`` on scikit-learn's 8x8 one-channel digits. Any :class:`attnzoo.models.ViT` keyword
(``attention=``, per-layer lists, ``num_classes``, ``in_chans``, ``img_size``, ``global_pool``, ...) overrides a
default. There are no pretrained weights: ``pretrained=True`` raises.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from attnzoo.models.vit import ViT


def _cfg(**overrides: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **overrides,
    }


default_cfgs = generate_default_cfgs(
    {
        "attnzoo_vit_tiny_patch16_224": _cfg(),
        "attnzoo_vit_small_patch16_224": _cfg(),
        "attnzoo_vit_base_patch16_224": _cfg(),
        # the digits' pixel statistics (0..16 intensities, scikit-learn's load_digits): mean 4.88, std 6.02
        "attnzoo_vit_digits_patch2_8": _cfg(
            num_classes=10, input_size=(1, 8, 8), crop_pct=1.0, mean=(4.88,), std=(6.02,), interpolation="nearest"
        ),
    }
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> ViT:
    if pretrained:
        raise ValueError(
            f"{variant}: attnzoo publishes no pretrained weights; call timm.create_model({variant!r}, "
            f"pretrained=False), train it, and load your own weights with ViT.from_pretrained(folder)."
        )
    # feature_cfg: timm's features_only / forward_intermediates conventions for ViTs (block outputs, no feature_info
    # stride reduction), as timm's own vision_transformer registers them
    return build_model_with_cfg(
        ViT, variant, pretrained=False, feature_cfg={"out_indices": 3, "feature_cls": "getter"}, **kwargs
    )


@register_model
def attnzoo_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-Tiny/16 (embed 192, depth 12, 3 heads) with any zoo attention."""
    return _create(
        "attnzoo_vit_tiny_patch16_224", pretrained, **{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs}
    )


@register_model
def attnzoo_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-Small/16 (embed 384, depth 12, 6 heads) with any zoo attention."""
    return _create(
        "attnzoo_vit_small_patch16_224", pretrained, **{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs}
    )


@register_model
def attnzoo_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> ViT:
    """ViT-Base/16 (embed 768, depth 12, 12 heads) with any zoo attention."""
    return _create(
        "attnzoo_vit_base_patch16_224", pretrained, **{"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs}
    )


@register_model
def attnzoo_vit_digits_patch2_8(pretrained: bool = False, **kwargs: Any) -> ViT:
    """The repo's digits ViT (configs/model/vit.yaml): 8x8 one-channel images, patch 2, embed 64, depth 4, 4 heads."""
    defaults = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 4}
    return _create("attnzoo_vit_digits_patch2_8", pretrained, **{**defaults, **kwargs})
