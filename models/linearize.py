"""``linearize``: turn a trained softmax model into a linear/recurrent (or hybrid) one that keeps most of its quality.

LoLCATs (Zhang et al. 2024, "LoLCATs: On Low-Rank Linearizing of Large Language Models",
https://arxiv.org/abs/2410.10254) in three stages, on any attnzoo GPT, ViT or Encoder (or a timm ViT):

0. **swap**: every softmax layer that is not kept is replaced by the target attention; the teacher's q/k/v/o
   weights move over by role (:mod:`attnzoo.models.swap`), everything else (feature maps, gates, norms) starts at
   the target layer's own initialisation.
1. **attention transfer**: only those fresh parameters train; the copied ones and the rest of the model are frozen.
   For every swapped layer l the loss is ``MSE(student_l(h_l), teacher_l(h_l))`` where ``h_l`` is the input the
   TEACHER's layer l received in the same forward pass (captured with hooks), so all layers learn at once from one
   teacher forward and no layer's error feeds the next (LoLCATs' layer-wise attention transfer; the total loss is the
   sum over layers).
2. **fine-tune**: every parameter trains on the task loss (next-token cross-entropy for a language model,
   cross-entropy on the labels for a classifier). LoLCATs fine-tunes with LoRA because its models have billions of
   parameters; the zoo's models are small enough that the full fine-tune is cheaper than maintaining adapters.

The teacher's q/k/v projections only move into projections of the same shape. Targets with an ``expand_k`` /
``expand_v`` option (GLA, RetNet, DeltaNet...) default to 0.5 keys in FLA, which would leave the teacher's q and k
behind, so unless the spec sets them they are built with 1.0 here (``match_teacher_shapes=False`` keeps the layer's
own defaults).

``attnzoo.models.linearize`` is the function (``attnzoo.models`` re-exports it under the module's name, so
``import attnzoo.models.linearize as m`` binds the function too); the stage functions are reached with
``from attnzoo.models.linearize import attention_transfer`` or ``importlib.import_module("attnzoo.models.linearize")``.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.layers.registry import Attention, attention_class, attention_options, split_spec
from attnzoo.layers.softmax import SoftmaxAttention
from attnzoo.models.swap import _source_config, _transfer
from attnzoo.models.vit import TimmAttentionAdapter, timm_attention_class

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a position without a target (the language-model task's convention)
# options that size the q/k/v projections; 1.0 makes them the teacher's shape so its weights move over
SHAPE_OPTIONS = ("expand_k", "expand_v")

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]
ForwardFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


@dataclass
class LinearizeReport:
    """What :func:`linearize` did. Names are full paths in the model (``blocks.0.attn.g_proj.weight``).

    Attributes:
        specs: one entry per attention layer of the result: the target spec for a swapped layer, None for a kept one.
        swapped: paths of the replaced attention modules.
        kept: paths of the softmax modules left in place (the softmax layers of a hybrid).
        copied: parameters of the new layers that received the teacher's weights (frozen during transfer).
        fresh: parameters of the new layers at their initialisation: the only ones attention transfer trains.
        transfer_losses: the summed per-layer MSE at every transfer step.
        transfer_layer_errors: per swapped layer, MSE / mean square of the teacher's output on the last transfer
            batch (0 = exact, 1 = as far off as predicting zeros).
        finetune_losses: the task loss at every fine-tune step.
    """

    specs: list[dict[str, Any] | None] = field(default_factory=list)
    swapped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    transfer_losses: list[float] = field(default_factory=list)
    transfer_layer_errors: dict[str, float] = field(default_factory=dict)
    finetune_losses: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"linearize: {len(self.swapped)} layers swapped, {len(self.kept)} kept softmax; {len(self.copied)} "
            f"parameters copied from the teacher, {len(self.fresh)} fresh; {len(self.transfer_losses)} transfer "
            f"steps, {len(self.finetune_losses)} fine-tune steps."
        )


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every top-level attention module of ``model`` in forward order: zoo layers and timm
    ``Attention`` modules (children of an attention, e.g. a mixture's experts, are not counted separately)."""
    from timm.layers import Attention as TimmAttention

    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if not path or not isinstance(module, (Attention, TimmAttention)):
            continue
        if any(path.startswith(parent + ".") for parent, _ in found):
            continue
        found.append((path, module))
    return found


def layer_specs(
    attention: Any, depth: int, keep_softmax_every: int | None = None, *, match_teacher_shapes: bool = True
) -> list[dict[str, Any] | None]:
    """One target spec per layer (None = keep the teacher's softmax layer).

    Args:
        attention: a name, ``{"name": ..., **options}``, or a list with one entry per layer where None keeps that
            layer (e.g. ``["gla", "gla", "gla", None]``).
        depth: number of attention layers of the model.
        keep_softmax_every: keep every k-th layer softmax (layers k-1, 2k-1, ...: 4 gives the 3:1 hybrid
            ``[x, x, x, softmax]``); only with a single ``attention`` entry.
        match_teacher_shapes: build targets with ``expand_k``/``expand_v`` at 1.0 unless the spec sets them.
    """
    if isinstance(attention, (list, tuple)):
        if keep_softmax_every is not None:
            raise ValueError(
                "linearize: give either keep_softmax_every or a per-layer attention list (None keeps a layer), "
                "not both."
            )
        if len(attention) != depth:
            raise ValueError(
                f"linearize: the per-layer attention list has {len(attention)} entries but the model has {depth} "
                f"attention layers; give one entry per layer (None keeps that softmax layer)."
            )
        entries = list(attention)
    else:
        bad_type = isinstance(keep_softmax_every, bool) or not isinstance(keep_softmax_every, int)
        if keep_softmax_every is not None and (bad_type or keep_softmax_every < 1):  # True is an int to Python
            raise ValueError(f"linearize: keep_softmax_every must be a positive int; got {keep_softmax_every!r}.")
        entries = [
            None if keep_softmax_every is not None and (i + 1) % keep_softmax_every == 0 else attention
            for i in range(depth)
        ]
    specs: list[dict[str, Any] | None] = []
    for entry in entries:
        if entry is None:
            specs.append(None)
            continue
        name, options = split_spec(entry)
        valid = attention_options(attention_class(name))  # an unknown name raises the registry's error here
        for key in options:
            if key not in valid:
                from attnzoo.errors import unknown

                raise TypeError(f"{name}: " + unknown("option", key, valid))
        if match_teacher_shapes:
            options = {**{k: 1.0 for k in SHAPE_OPTIONS if k in valid}, **options}
        specs.append({"name": name, **options})
    if all(spec is None for spec in specs):
        raise ValueError(f"linearize: every one of the {depth} layers is kept; nothing would be linearized.")
    return specs


def _is_softmax(module: nn.Module) -> bool:
    from timm.layers import Attention as TimmAttention

    return isinstance(module, (SoftmaxAttention, TimmAttention))


def _pattern(module: nn.Module) -> str:
    if isinstance(module, Attention):
        return module.pattern
    return "noncausal_self"  # timm's Attention


def _build_replacement(model: nn.Module, old: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """The target layer for ``old``, same width, heads and (for timm blocks) biases and dropout."""
    from timm.layers import Attention as TimmAttention

    reference = next(old.parameters())
    factory = {"device": reference.device, "dtype": reference.dtype}
    if isinstance(old, (TimmAttentionAdapter, TimmAttention)):  # called by a timm Block: build it timm's way
        patch_embed = getattr(model, "patch_embed", None)
        cls = timm_attention_class(
            spec,
            grid_size=getattr(patch_embed, "grid_size", None),
            num_prefix_tokens=getattr(model, "num_prefix_tokens", 0),
        )
        config = _source_config(old)
        return cls(config.pop("dim"), **config, **factory)
    name, options = split_spec(spec)
    return attention_class(name)(old.dim, old.num_heads, causal=old.causal, cross=old.cross, **factory, **options)


def swap_layers(model: nn.Module, specs: list[dict[str, Any] | None], report: LinearizeReport) -> list[str]:
    """Stage 0: replace the softmax layers that have a spec, in place; returns the swapped paths.

    Every layer is checked (softmax teacher, a pattern the target has) before the model is touched, so an error leaves
    it unchanged.
    """
    layers = attention_layers(model)
    if len(layers) != len(specs):
        raise ValueError(f"linearize: {len(specs)} layer specs for a model with {len(layers)} attention layers.")
    for (path, old), spec in zip(layers, specs, strict=True):
        if spec is None:
            continue
        if not _is_softmax(old):
            got = getattr(old, "name", "") or type(old).__name__
            raise ValueError(
                f"linearize: {path} is {got}, not softmax attention; linearize distils a softmax teacher. Start from "
                f"a model trained with attention=softmax, or keep that layer (None in a per-layer attention list)."
            )
        target = attention_class(spec["name"])
        pattern = _pattern(old)
        if pattern not in target.patterns:
            note = f" {target.pattern_note}" if target.pattern_note else ""
            raise ValueError(
                f"linearize: {spec['name']} has no pattern {pattern!r} (it has: {', '.join(sorted(target.patterns))}),"
                f" which {path} needs.{note} Choose an attention with it: "
                f"attnzoo.layers.list_attention({pattern!r})."
            )
    swapped = []
    for (path, old), spec in zip(layers, specs, strict=True):
        if spec is None:
            report.kept.append(path)
            continue
        new = _build_replacement(model, old, spec)
        copied, fresh, _dropped = _transfer(old, new)
        new.train(old.training)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
        report.copied += [f"{path}.{n}" for n in copied]
        report.fresh += [f"{path}.{n}" for n in fresh]
        swapped.append(path)
    report.swapped += swapped
    report.specs = list(specs)
    if hasattr(model, "attention_names"):
        model.attention_names = [getattr(m, "name", "softmax") for _, m in attention_layers(model)]
    return swapped


def forward_batch(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The model's output for a batch of the zoo's data modules: ``input_ids`` (language models) or ``inputs``
    (classifiers), with the batch's ``padding_mask`` when it has one."""
    mask = batch.get("padding_mask")
    inputs = batch["input_ids"] if "input_ids" in batch else batch["inputs"]
    return model(inputs) if mask is None else model(inputs, padding_mask=mask)


def task_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The training tasks' loss: next-token cross-entropy over labelled positions for ``input_ids`` batches (labels
    already aligned, -100 ignored), cross-entropy on one label per example otherwise."""
    logits = forward_batch(model, batch)
    labels = batch["labels"]
    if "input_ids" in batch:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], max_batches: int | None = None
) -> dict[str, float]:
    """Token-weighted (language model) or example-weighted (classifier) mean loss and accuracy, in eval mode.

    Returns ``{"loss", "acc"}``; for a language model, bits per token = loss / ln 2.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in itertools.islice(batches, max_batches):
        logits = forward_batch(model, batch)
        labels = batch["labels"]
        if "input_ids" in batch:
            logits, labels = logits.flatten(0, 1), labels.flatten()
        keep = labels != IGNORE_INDEX
        logits, labels = logits[keep].float(), labels[keep]
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += int(labels.numel())
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: the batches hold no labelled position.")
    return {"loss": total_loss / count, "acc": correct / count}


def _cycle(batches: Iterable[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    """Batches forever, restarting the iterable (a DataLoader reshuffles) when it ends."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("linearize: the data yields no batch.")


def _scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    # imported here: attnzoo.training's package imports Lightning and Hydra, which attnzoo.models must not need
    from attnzoo.training.optim import warmup_cosine

    schedule = lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def attention_transfer(
    model: nn.Module,
    teacher: nn.Module,
    swapped: list[str],
    trainable: list[str],
    batches: Iterator[dict[str, Tensor]],
    *,
    steps: int,
    lr: float,
    warmup_steps: int = 0,
    forward_fn: ForwardFn = forward_batch,
    report: LinearizeReport | None = None,
) -> list[float]:
    """Stage 1: train only ``trainable`` (full parameter names of ``model``) so that each swapped layer, given the
    teacher's input to that layer, reproduces the teacher layer's output; returns the loss of every step.

    ``teacher`` is the model before the swap (frozen, in eval mode); its layers at the ``swapped`` paths are hooked.
    """
    if steps <= 0:
        return []
    params = dict(model.named_parameters())
    trainable_set = set(trainable)
    if not trainable_set:
        raise ValueError(
            "linearize: the swapped layers have no fresh parameters (every one was copied from the teacher), so "
            "attention transfer has nothing to train; use transfer_steps=0."
        )
    flags = {name: p.requires_grad for name, p in params.items()}
    for name, p in params.items():
        p.requires_grad_(name in trainable_set)
    students = {path: model.get_submodule(path) for path in swapped}
    captured: dict[str, tuple[tuple, dict, Tensor]] = {}

    def hook(path: str) -> Callable:
        def capture(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            captured[path] = (args, kwargs, output)

        return capture

    handles = [teacher.get_submodule(p).register_forward_hook(hook(p), with_kwargs=True) for p in swapped]
    optimizer = torch.optim.AdamW([params[n] for n in trainable], lr=lr, weight_decay=0.0)
    scheduler = _scheduler(optimizer, steps, warmup_steps)
    teacher.eval()
    losses: list[float] = []
    try:
        for _ in range(steps):
            batch = next(batches)
            captured.clear()
            with torch.no_grad():
                forward_fn(teacher, batch)
            errors = {}
            loss = torch.zeros((), device=next(model.parameters()).device)
            for path, student in students.items():
                args, kwargs, target = captured[path]
                out = student(*args, **kwargs)
                mse = F.mse_loss(out.float(), target.float())
                errors[path] = float(mse.detach()) / max(float(target.float().square().mean()), 1e-30)
                loss = loss + mse
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([params[n] for n in trainable], 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"linearize: the transfer loss became {losses[-1]}; lower the transfer lr.")
        if report is not None:
            report.transfer_layer_errors = errors
    finally:
        for handle in handles:
            handle.remove()
        for name, p in params.items():
            p.requires_grad_(flags[name])
    return losses


def finetune(
    model: nn.Module,
    batches: Iterator[dict[str, Tensor]],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.1,
    warmup_steps: int = 0,
    loss_fn: LossFn = task_loss,
) -> list[float]:
    """Stage 2: every parameter on the task loss (AdamW with the training tasks' no-decay groups, warmup + cosine,
    gradients clipped at norm 1 as the trainer config does); returns the loss of every step."""
    if steps <= 0:
        return []
    from attnzoo.training.optim import build_optimizer  # lazily, as in _scheduler

    optimizer = build_optimizer(model, {"lr": lr, "weight_decay": weight_decay, "betas": (0.9, 0.95)})
    scheduler = _scheduler(optimizer, steps, warmup_steps)
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_fn(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"linearize: the fine-tune loss became {losses[-1]}; lower the fine-tune lr.")
    return losses


def linearize(
    model: nn.Module,
    attention: Any,
    *,
    data: Iterable[dict[str, Tensor]] | None = None,
    keep_softmax_every: int | None = None,
    transfer_steps: int = 200,
    finetune_steps: int = 300,
    transfer_lr: float = 1e-2,
    finetune_lr: float = 1e-3,
    warmup_ratio: float = 0.1,
    match_teacher_shapes: bool = True,
    forward_fn: ForwardFn = forward_batch,
    loss_fn: LossFn = task_loss,
    report: LinearizeReport | None = None,
) -> nn.Module:
    """Swap ``model``'s softmax layers for ``attention``, transfer, fine-tune (module docstring); in place.

    Args:
        model: a trained model with softmax attention (GPT, ViT, Encoder, a timm ViT).
        attention: the target: a name, ``{"name": ..., **options}``, or one entry per layer (None keeps a layer).
        data: batches of the model's training data (dicts as the zoo's data modules yield: ``input_ids`` or
            ``inputs``, ``labels``, optional ``padding_mask``); re-iterated when it ends. Needed when a stage has
            steps.
        keep_softmax_every: keep every k-th layer softmax (4: the 3:1 hybrid of Jamba / Liger-style models).
        transfer_steps: attention-transfer steps (stage 1); 0 skips it.
        finetune_steps: full fine-tune steps on the task loss (stage 2); 0 skips it.
        transfer_lr: AdamW learning rate of stage 1 (LoLCATs trains its feature maps at 1e-2).
        finetune_lr: AdamW learning rate of stage 2.
        warmup_ratio: linear warmup over this fraction of each stage's steps, then cosine to 0.1x.
        match_teacher_shapes: build targets with ``expand_k``/``expand_v`` at 1.0 unless given, so the teacher's q/k
            move over.
        forward_fn: ``forward_fn(model, batch)`` runs the model (the teacher in stage 1).
        loss_fn: ``loss_fn(model, batch) -> scalar`` of stage 2 (default: the training tasks' cross-entropy).
        report: a :class:`LinearizeReport` to fill in (what was swapped, copied, trained, the losses).

    Returns:
        ``model``, linearized.

    Raises:
        ValueError: unknown attention (the registry's message), a layer that is not softmax, a pattern the target
            does not have, a per-layer list of the wrong length, no data for a stage with steps.
    """
    report = LinearizeReport() if report is None else report
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"linearize: {type(model).__name__} has no attention layer to replace.")
    specs = layer_specs(attention, len(layers), keep_softmax_every, match_teacher_shapes=match_teacher_shapes)
    if (transfer_steps > 0 or finetune_steps > 0) and data is None:
        raise ValueError("linearize: pass data= (an iterable of training batches) or set both step counts to 0.")
    teacher = copy.deepcopy(model).requires_grad_(False) if transfer_steps > 0 else None
    swapped = swap_layers(model, specs, report)
    batches = _cycle(data) if data is not None else iter(())
    report.transfer_losses = attention_transfer(
        model,
        teacher,
        swapped,
        report.fresh,
        batches,
        steps=transfer_steps,
        lr=transfer_lr,
        warmup_steps=int(warmup_ratio * transfer_steps),
        forward_fn=forward_fn,
        report=report,
    )
    del teacher
    report.finetune_losses = finetune(
        model,
        batches,
        steps=finetune_steps,
        lr=finetune_lr,
        warmup_steps=int(warmup_ratio * finetune_steps),
        loss_fn=loss_fn,
    )
    log.info("%s", report)
    return model
