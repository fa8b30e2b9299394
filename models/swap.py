"""``swap_attention``: put a zoo attention into an existing timm ViT-family model, in place, keeping what weights fit.

Every self-attention module of the model (timm's ``timm.layers.Attention``, as used by ``VisionTransformer``, DeiT,
BEiT-style and other ViT-family models, or a zoo attention already swapped in) is replaced by the zoo layer built
with the same width, heads, biases, qk-norm and dropout. Weights move by role, not by luck:

* same name and shape (``qkv``, ``proj``, ``q_norm``, ``k_norm`` for the zoo's ``softmax``) -> copied;
* timm's fused ``qkv`` split into q, k, v for layers with separate projections named ``q_proj``/``k_proj``/``v_proj``
  (FLA), ``to_q``/``to_k``/``to_v`` (performer-pytorch), ``q``/``k``/``v``; ``kv`` gets k and v stacked;
* ``proj`` -> ``o_proj``/``out_proj``/``to_out`` when the shapes agree.

A parameter whose shape differs (GLA's ``expand_k=0.5`` keys, Mamba's ``in_proj``) keeps the zoo layer's own
initialisation and is reported as new. The block norms (``norm1``, ``norm2``) and everything outside the attention
are untouched, so they keep their trained values. ``LayerNorm`` epsilons inside the attention (qk-norm) are copied
too, which is what makes ``swap_attention(model, "softmax")`` reproduce the original outputs exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo.layers.registry import Attention
from attnzoo.models.vit import timm_attention_class

log = logging.getLogger(__name__)

# module name in the new layer -> the role it plays; roles are read out of timm's qkv/proj
_ROLES: dict[str, str] = {
    **{n: "q" for n in ("q", "q_proj", "to_q", "wq")},
    **{n: "k" for n in ("k", "k_proj", "to_k", "wk")},
    **{n: "v" for n in ("v", "v_proj", "to_v", "wv")},
    **{n: "proj" for n in ("proj", "o_proj", "out_proj", "to_out", "to_out.0", "wo")},
    "kv": "kv",
    "qkv": "qkv",
}


@dataclass
class SwapReport:
    """What :func:`swap_attention` did. Parameter names are full paths in the model (``blocks.0.attn.qkv.weight``).

    Attributes:
        attention: the zoo attention name swapped in.
        modules: paths of the replaced attention modules.
        transferred: new parameters that received the old weights.
        new: new parameters left at the zoo layer's initialisation (they need training).
        dropped: old parameters whose values went nowhere.
    """

    attention: str
    modules: list[str] = field(default_factory=list)
    transferred: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"swap_attention -> {self.attention}: {len(self.modules)} attention modules replaced; "
            f"{len(self.transferred)} parameters transferred, {len(self.new)} new, {len(self.dropped)} dropped."
        )


def _is_source(module: nn.Module) -> bool:
    from timm.layers import Attention as TimmAttention

    if isinstance(module, TimmAttention):
        return True
    return isinstance(module, Attention) and module.pattern == "noncausal_self" and hasattr(module, "qkv")


def _source_config(module: nn.Module) -> dict[str, Any]:
    """The timm constructor keywords that rebuild ``module``'s shape and regularisation."""

    def drop(value: Any) -> float:
        return float(value.p) if isinstance(value, nn.Dropout) else float(value or 0.0)

    return {
        "dim": module.qkv.in_features,
        "num_heads": module.num_heads,
        "qkv_bias": module.qkv.bias is not None,
        "proj_bias": module.proj.bias is not None,
        "qk_norm": not isinstance(getattr(module, "q_norm", nn.Identity()), nn.Identity),
        "attn_drop": drop(getattr(module, "attn_drop", 0.0)),
        "proj_drop": drop(getattr(module, "proj_drop", 0.0)),
    }


def _old_pieces(old: dict[str, Tensor]) -> dict[str, tuple[Tensor, list[str]]]:
    """Old tensors by ``role.param`` (``q.weight``, ``kv.bias``, ``proj.weight``, ...), with the old names they use."""
    pieces: dict[str, tuple[Tensor, list[str]]] = {}
    for param in ("weight", "bias"):
        if f"qkv.{param}" in old:
            fused = old[f"qkv.{param}"]
            q, k, v = fused.chunk(3, dim=0)  # timm orders the output rows [q | k | v]
            src = [f"qkv.{param}"]
            pieces |= {f"qkv.{param}": (fused, src), f"q.{param}": (q, src), f"k.{param}": (k, src)}
            pieces |= {f"v.{param}": (v, src), f"kv.{param}": (torch.cat([k, v]), src)}
        if f"proj.{param}" in old:
            pieces[f"proj.{param}"] = (old[f"proj.{param}"], [f"proj.{param}"])
    return pieces


def _transfer(old_module: nn.Module, new_module: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """Copy what fits from ``old_module`` into ``new_module``; returns (transferred, new, dropped) local names."""
    old = old_module.state_dict()
    pieces = _old_pieces(old)
    used: set[str] = set()
    transferred, new = [], []
    with torch.no_grad():
        for name, tensor in new_module.state_dict(keep_vars=True).items():
            module_path, _, param = name.rpartition(".")
            role = _ROLES.get(module_path)
            source = None
            if name in old and old[name].shape == tensor.shape:
                source = (old[name], [name])
            elif role is not None and f"{role}.{param}" in pieces:
                candidate = pieces[f"{role}.{param}"]
                if candidate[0].shape == tensor.shape:
                    source = candidate
            if source is None:
                if isinstance(tensor, nn.Parameter):
                    new.append(name)
                continue
            tensor.copy_(source[0].to(tensor.dtype))
            used.update(source[1])
            if isinstance(tensor, nn.Parameter):
                transferred.append(name)
    # qk-norm and similar: keep the original epsilon (timm's LayerNorm uses 1e-6, torch's 1e-5)
    old_modules = dict(old_module.named_modules())
    for name, module in new_module.named_modules():
        if name and name in old_modules and hasattr(module, "eps") and hasattr(old_modules[name], "eps"):
            module.eps = old_modules[name].eps
    dropped = [n for n, p in old_module.named_parameters() if n not in used]
    return transferred, new, dropped


def swap_attention(model: nn.Module, name: str, **options: Any) -> SwapReport:
    """Replace every self-attention module of a timm ViT-family ``model`` by the zoo attention ``name``, in place.

    Args:
        model: e.g. ``timm.create_model("vit_tiny_patch16_224", pretrained=False)`` or an attnzoo ``ViT``.
        name: a registered attention with the ``noncausal_self`` pattern.
        **options: the layer's options (``attention_info(name).options``); ``grid_size``/``num_prefix_tokens`` are
            filled from the model's patch embedding when the layer takes them.

    Returns:
        A :class:`SwapReport` listing transferred, new and dropped parameters (full names in the model).

    Raises:
        ValueError: the model has no timm/zoo self-attention module, or the layer lacks ``noncausal_self``.
        TypeError: an unknown option for the layer.
    """
    targets = [(path, m) for path, m in model.named_modules() if path and _is_source(m)]
    if not targets:
        raise ValueError(
            f"swap_attention: {type(model).__name__} has no timm Attention (timm.layers.Attention) or zoo "
            f"self-attention module with a 'qkv' projection to replace."
        )
    patch_embed = getattr(model, "patch_embed", None)
    grid_size = getattr(patch_embed, "grid_size", None)
    num_prefix_tokens = getattr(model, "num_prefix_tokens", 0)
    cls = timm_attention_class({"name": name, **options}, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens)
    report = SwapReport(attention=name)
    for path, old_module in targets:
        config = _source_config(old_module)
        reference = next(old_module.parameters())
        new_module = cls(config.pop("dim"), **config, device=reference.device, dtype=reference.dtype)
        transferred, new, dropped = _transfer(old_module, new_module)
        new_module.train(old_module.training)
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, new_module)
        report.modules.append(path)
        report.transferred += [f"{path}.{n}" for n in transferred]
        report.new += [f"{path}.{n}" for n in new]
        report.dropped += [f"{path}.{n}" for n in dropped]
    if hasattr(model, "attention_names"):
        model.attention_names = [name] * len(targets)
    log.info("%s", report)
    return report
