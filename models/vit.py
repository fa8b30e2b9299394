"""ViT: timm's ``VisionTransformer`` with any registered attention (Dosovitskiy et al. 2021, "An Image is Worth 16x16
Words", https://arxiv.org/abs/2010.11929).

The backbone *is* a ``timm.models.vision_transformer.VisionTransformer`` (patch embedding, class/register tokens,
learned positions, pre-norm ``Block``s, pooling, head, timm's weight init), so timm's parameter names are kept and a
timm ViT state_dict loads into a softmax ViT unchanged. Only the attention changes:

* ``timm_attention_class(spec)`` turns a zoo attention spec into a *class* that timm can hand to ``Block``
  (timm calls ``issubclass`` on ``attn_layer``, so a partial will not do). The class is a subclass of the zoo layer
  (parameter names stay the zoo layer's: ``qkv``/``proj`` for softmax, as timm's), accepts timm's constructor
  keywords (``qkv_bias``, ``qk_norm``, ``proj_bias``, ``attn_drop``, ``proj_drop``, ...) and timm's forward call
  ``attn(x, attn_mask=None, is_causal=False)``.
* Per-layer attention (hybrids such as ``["gla", "gla", "gla", "softmax"]``) goes through a block factory passed as
  timm's ``block_fn``; timm gives it the block index.
* Layers that need the 2-D token grid (agent attention) receive ``grid_size=(h, w)`` and ``num_prefix_tokens``
  whenever ``attention_info(name).options`` lists those options, and layers with a ``layer_index`` option receive
  their block's index (0 .. depth - 1; Swin shifts its windows on odd blocks), unless the spec sets them: an option
  absent or None (as ``configs/attention/*.yaml`` write them) is filled in.

Defaults are timm's ``vit_tiny_patch16_224`` (embed_dim 192, depth 12, heads 3, qkv_bias True); the Hydra config
``configs/model/vit.yaml`` sets a CPU-sized model for the 8x8 digits.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from timm.layers import to_2tuple
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from attnzoo.errors import unknown
from attnzoo.layers.factory import accepts_device_dtype
from attnzoo.layers.registry import Attention, attention_class, attention_options, split_spec
from attnzoo.models.pretrained import PretrainedMixin
from attnzoo.models.specs import per_layer

# timm constructor keywords that a zoo layer takes when it has an option of the same name
_TIMM_OPTIONS = ("qkv_bias", "proj_bias", "qk_norm", "attn_drop", "proj_drop")


class TimmAttentionAdapter:
    """Mixin that lets a zoo attention be built and called the way timm's ``Block`` builds and calls ``Attention``.

    Not used directly: :func:`timm_attention_class` creates ``class X(TimmAttentionAdapter, <zoo layer>)``.
    """

    zoo_base: ClassVar[type[Attention]]
    zoo_spec: ClassVar[dict[str, Any]] = {}  # the zoo options fixed by the spec; they win over timm's keywords

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        """
        Args:
            dim: model width (timm's ``dim``).
            num_heads: heads.
            qkv_bias, proj_bias: passed to the zoo layer if it has these options, otherwise ignored (a layer without
                a ``qkv`` projection has no such bias to switch).
            qk_norm, attn_drop, proj_drop: passed if the layer has the option; asking for a non-default value from
                a layer that lacks it raises, since silently ignoring it would change the model.
            scale_norm: timm's norm before ``proj``; no zoo layer has it, so True raises.
            norm_layer: timm's norm class for qk_norm; zoo layers use their own norm.
            device, dtype: where and in which floating-point dtype to create the parameters (timm's factory
                keywords; the zoo layer's own device/dtype handling, see ``attnzoo.layers.factory``).
        """
        zoo_cls = type(self).zoo_base
        label = zoo_cls.name
        valid = attention_options(zoo_cls)
        options = dict(type(self).zoo_spec)
        timm_values = {
            "qkv_bias": qkv_bias,
            "proj_bias": proj_bias,
            "qk_norm": qk_norm,
            "attn_drop": attn_drop,
            "proj_drop": proj_drop,
        }
        for key, value in timm_values.items():
            if key in options:
                continue
            if key in valid:
                options[key] = value
            elif key in ("qk_norm", "attn_drop", "proj_drop") and value:
                raise ValueError(
                    f"{label} has no option {key!r}, so a ViT with {key}={value!r} cannot use it; "
                    f"build the ViT with {key}={'False' if key == 'qk_norm' else '0.0'}."
                )
        if scale_norm:
            raise ValueError(f"{label}: timm's scale_attn_norm=True has no zoo equivalent; build the ViT without it.")
        super().__init__(dim, num_heads, causal=False, cross=False, device=device, dtype=dtype, **options)

    def __reduce_ex__(self, protocol: int) -> Any:
        # the class is made at run time, so pickle (ddp_spawn, torch.save of a whole model) rebuilds it from the spec
        cls = type(self)
        return (_new_adapter, (cls.zoo_base.name, dict(cls.zoo_spec)), self.__getstate__())

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        context: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: Any = None,
    ) -> Tensor:
        """timm's call ``attn(x, attn_mask=None, is_causal=False)`` or the zoo's keyword call.

        ``attn_mask`` may be a key padding mask (bool, True = attend) of shape (B, N) or (B, 1, 1, N); general
        (N, N) masks are not part of the zoo contract and raise.
        """
        label = type(self).zoo_base.name
        if is_causal:
            raise ValueError(f"{label} in a ViT is built non-causal; is_causal=True is not supported here.")
        if attn_mask is not None:
            if padding_mask is not None:
                raise ValueError(f"{label}: pass either attn_mask (timm) or padding_mask (zoo), not both.")
            padding_mask = _key_padding_mask(attn_mask, x, label)
        return super().forward(x, context=context, padding_mask=padding_mask, cache=cache)


def _key_padding_mask(attn_mask: Tensor, x: Tensor, label: str) -> Tensor:
    B, N = x.shape[:2]
    if attn_mask.dtype == torch.bool:
        if attn_mask.shape == (B, N):
            return attn_mask
        if attn_mask.shape == (B, 1, 1, N):
            return attn_mask[:, 0, 0]
    raise ValueError(
        f"{label}: attn_mask must be a bool key padding mask of shape (B, N) = {(B, N)} or (B, 1, 1, N) "
        f"(True = attend); got {attn_mask.dtype} {tuple(attn_mask.shape)}. Zoo attention layers take key padding "
        f"masks only."
    )


_ADAPTERS: dict[str, type] = {}


def _new_adapter(name: str, options: dict[str, Any]) -> Any:
    """Unpickling helper: an empty instance of the adapter class for ``name`` with ``options``."""
    cls = timm_attention_class({"name": name, **options})
    return cls.__new__(cls)


def timm_attention_class(
    spec: Any, *, grid_size: tuple[int, int] | None = None, num_prefix_tokens: int = 0, layer_index: int | None = None
) -> type[Attention]:
    """A class timm can use as ``attn_layer`` for the zoo attention ``spec`` (a name or ``{"name": ..., **opts}``).

    Args:
        spec: registered attention name or mapping with a ``name`` and the layer's options.
        grid_size: (h, w) patch grid, passed to layers that take ``grid_size`` (agent attention).
        num_prefix_tokens: class/register tokens before the grid, passed to layers that take it.
        layer_index: the block's index in the backbone, passed to layers that take it (swin), unless the spec sets it.

    Raises:
        ValueError: unknown attention, or a layer without ``noncausal_self``.
        TypeError: an option the layer does not take.
    """
    name, options = split_spec(spec)
    base = attention_class(name)
    if "noncausal_self" not in base.patterns:
        raise ValueError(
            f"{name} has no pattern 'noncausal_self' (it has: {', '.join(sorted(base.patterns))}); a ViT needs "
            f"bidirectional self-attention over the patches."
        )
    valid = attention_options(base)
    for key in options:
        if key not in valid:
            raise TypeError(f"{name}: " + unknown("option", key, valid))
    # an option left unset (absent, or None as the configs write it) is the backbone's to fill in
    if grid_size is not None and "grid_size" in valid and options.get("grid_size") is None:
        options["grid_size"] = tuple(int(s) for s in grid_size)
    if "num_prefix_tokens" in valid and options.get("num_prefix_tokens") is None:
        options["num_prefix_tokens"] = int(num_prefix_tokens)
    if layer_index is not None and "layer_index" in valid and options.get("layer_index") is None:
        options["layer_index"] = int(layer_index)
    # one class per (layer, options): the same spec gives the same class, so isinstance checks and repr stay tidy
    key = f"{name}:{sorted(options.items())!r}"
    if key not in _ADAPTERS:
        _ADAPTERS[key] = type(
            f"Timm{base.__name__}",
            (TimmAttentionAdapter, base),
            {"zoo_base": base, "zoo_spec": options, "__module__": __name__, "__doc__": base.__doc__},
        )
    return _ADAPTERS[key]


class _BlockFactory:
    """timm's ``block_fn``: builds timm's ``Block`` with the attention class of its layer index (``depth=i``)."""

    def __init__(self, attn_layers: list[type]) -> None:
        self.attn_layers = attn_layers

    def __call__(self, *, attn_layer: Any = None, depth: int = 0, **kwargs: Any) -> Block:
        return Block(attn_layer=self.attn_layers[depth], depth=depth, **kwargs)


class ViT(VisionTransformer, PretrainedMixin):
    """timm VisionTransformer whose attention (per layer) is any registered ``noncausal_self`` layer."""

    task = "classification"

    @accepts_device_dtype
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        *,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        attention: Any = "softmax",
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        reg_tokens: int = 0,
        global_pool: str = "token",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        **timm_kwargs: Any,
    ) -> None:
        """
        Args:
            img_size: input resolution (int or (h, w)).
            patch_size: patch size; the token grid is img_size // patch_size.
            in_chans: image channels.
            num_classes: classifier outputs (0: no head, features only).
            embed_dim: model width.
            depth: number of blocks.
            num_heads: attention heads per block.
            attention: a name, ``{"name": ..., **options}``, or a list with one entry per block.
            mlp_ratio: MLP hidden width / embed_dim.
            qkv_bias: bias in q/k/v projections (timm ViT default True), for layers with that option.
            class_token: prepend a class token.
            reg_tokens: register tokens (Darcet et al. 2024).
            global_pool: ``token`` (class token), ``avg``, ``max``, ``avgmax``, ``''``.
            drop_rate: dropout before the head.
            drop_path_rate: stochastic depth, linear over the blocks (timm's rule).
            **timm_kwargs: any other ``VisionTransformer`` argument (``pos_drop_rate``, ``init_values``, ...).
            device: where to create the parameters (``"meta"``: shapes only), as for torch modules.
            dtype: floating-point dtype of the parameters (built in float32 with timm's init, then converted; the
                attention layers' float32_params stay float32 at least).
        """
        if "block_fn" in timm_kwargs or "attn_layer" in timm_kwargs:
            raise TypeError("ViT: pass attention= (zoo names or specs) instead of block_fn/attn_layer.")
        grid = tuple(s // p for s, p in zip(to_2tuple(img_size), to_2tuple(patch_size)))
        if min(grid) < 1:
            raise ValueError(f"ViT: patch_size={patch_size} is larger than img_size={img_size}; no patches.")
        num_prefix = (1 if class_token else 0) + reg_tokens
        specs = per_layer(attention, depth)
        attn_layers = [
            timm_attention_class(s, grid_size=grid, num_prefix_tokens=num_prefix, layer_index=i)
            for i, s in enumerate(specs)
        ]
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            class_token=class_token,
            reg_tokens=reg_tokens,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            block_fn=_BlockFactory(attn_layers),
            **timm_kwargs,
        )
        self.attention_names = [split_spec(s)[0] for s in specs]

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's ViT init (trunc-normal 0.02 Linear weights, zero biases), except parameters that an attention
        layer marks ``_no_reinit = True`` (mamba_ssm's convention, e.g. Mamba's dt bias): they keep the layer's
        own initialisation."""
        keep = {
            name: p.detach().clone()
            for name, p in self.named_parameters()
            if getattr(p, "_no_reinit", False) and ".attn." in f".{name}"
        }
        super().init_weights(mode, needs_reset)
        with torch.no_grad():
            params = dict(self.named_parameters())
            for name, value in keep.items():
                params[name].copy_(value)

    @property
    def aux_loss(self) -> Tensor | None:
        """Sum of the attention layers' auxiliary losses from the last forward (None if no layer has one)."""
        losses = [b.attn.aux_loss for b in self.blocks if getattr(b.attn, "aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else None

    def attention_layers(self) -> list[nn.Module]:
        """The attention module of every block, in order."""
        return [b.attn for b in self.blocks]
