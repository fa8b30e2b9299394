"""Linearize a trained softmax run: swap its attention, attention transfer, fine-tune; write a normal run directory.

    python scripts/linearize.py --checkpoint outputs/<date>/<time>/checkpoints/best.ckpt --attention gla
    python scripts/linearize.py --checkpoint <run>/checkpoints/last.ckpt --attention gla --keep-softmax-every 4 \\
        --transfer-steps 200 --finetune-steps 300 --report
    python scripts/linearize.py --checkpoint <run>/checkpoints/last.ckpt --attention gla --keep-softmax-layers 1

The run's configuration (model, data, optimizer, trainer, callbacks) is read from its ``config.yaml`` next to the
``checkpoints/`` folder, so the model linearizes on its own training data. Stages 0 and 1 (swap, attention transfer)
are ``attnzoo.models.linearize``'s; stage 2, the fine-tune, runs through a Lightning Trainer built from the run's
config, so the output directory is a normal run directory: ``config.yaml`` (with the new per-layer attention),
``checkpoints/last.ckpt`` and ``best-*.ckpt``, ``metrics.csv``, ``model.safetensors`` and ``summary.json`` (which adds a
``linearize`` section: the quality after every stage, what was copied and trained). Resume or continue it with

    python train.py --config-path <out> --config-name config ckpt_path=<out>/checkpoints/last.ckpt \\
        trainer.max_steps=<total steps, counted from the start of the fine-tune>

(the script prints this command and writes it to ``summary.json`` as ``linearize.resume``, with twice the fine-tune's
steps)

and sample from it with ``scripts/generate.py --checkpoint <out>/checkpoints/last.ckpt`` (text runs).
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

OUTPUT_KEY = "${paths.output_dir}"


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``expand_k=1.0``, ``use_short_conv=true``, ``clamp_min=null``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"linearize: --option takes key=value (e.g. --option expand_k=0.5); got {text!r}.")
    return key, yaml.safe_load(value)


def _replace_prefix(node: Any, old: str, new: str) -> Any:
    """Every string under ``node`` that starts with ``old`` gets ``new`` instead (the run directory's paths)."""
    if isinstance(node, dict):
        return {k: _replace_prefix(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_prefix(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old + "/")):
        return new + node[len(old) :]
    return node


def _instantiate_all(group: dict[str, Any] | None) -> list[Any]:
    from hydra.utils import instantiate

    return [instantiate(c) for c in (group or {}).values() if isinstance(c, dict) and "_target_" in c]


def load_teacher(checkpoint: Path) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(the run's config, the task with the checkpoint's weights, the checkpoint's hyper-parameters)."""
    from omegaconf import OmegaConf

    from attnzoo.models import MODELS
    from attnzoo.models.io import CheckpointError, load_checkpoint
    from attnzoo.targets import resolve_class
    from attnzoo.training import TASKS

    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as err:
        raise SystemExit(f"linearize: {err}") from None
    config_path = checkpoint.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise SystemExit(
            f"linearize: no {config_path}; --checkpoint must be inside a run directory written by train.py "
            f"(<run>/checkpoints/<name>.ckpt next to <run>/config.yaml), whose config gives the data to train on."
        )
    cfg = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    hparams = ckpt.get("hyper_parameters") or {}
    if "model" not in hparams:
        raise SystemExit(f"linearize: {checkpoint} has no model config in its hyper_parameters; not a train.py run.")
    task_cls = TASKS[getattr(resolve_class(hparams["model"], MODELS, "model"), "task", "lm")]
    task = task_cls(**hparams)
    task.load_state_dict(ckpt["state_dict"])
    return cfg, task, hparams


def _minimal_spec(spec: dict[str, Any]) -> Any:
    """A per-layer entry without the options that equal configs/attention/<name>.yaml (the config stays readable)."""
    from attnzoo.training.run import attention_defaults

    defaults = attention_defaults(spec["name"])
    extra = {k: v for k, v in spec.items() if k != "name" and defaults.get(k, object()) != v}
    return {"name": spec["name"], **extra} if extra else spec["name"]


def linearize_run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``main`` does; returns the summary written to ``<out>/summary.json``."""
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from attnzoo.data import build_datamodule
    from attnzoo.models import per_layer
    from attnzoo.models.linearize import (
        LinearizeReport,
        _cycle,
        attention_layers,
        attention_transfer,
        evaluate,
        layer_specs,
        swap_layers,
    )
    from attnzoo.training import faults
    from attnzoo.training.callbacks import ThroughputMonitor
    from attnzoo.training.summary import write_summary

    started = time.perf_counter()
    checkpoint = Path(args.checkpoint).expanduser().resolve()
    cfg, teacher_task, hparams = load_teacher(checkpoint)
    torch.set_num_threads(int(args.threads or cfg.get("num_threads") or 1))
    L.seed_everything(args.seed, workers=True)
    model = teacher_task.model
    depth = len(attention_layers(model))
    target: Any = {"name": args.attention, **dict(parse_option(o) for o in args.option)}
    try:
        if args.keep_softmax_layers:
            if args.keep_softmax_every is not None:
                raise ValueError("give either --keep-softmax-every or --keep-softmax-layers, not both.")
            outside = sorted(set(args.keep_softmax_layers) - set(range(depth)))
            if outside:
                raise ValueError(
                    f"--keep-softmax-layers {outside} outside the model's {depth} attention layers (0 .. {depth - 1})."
                )
            target = [None if i in args.keep_softmax_layers else target for i in range(depth)]
        specs = layer_specs(target, depth, args.keep_softmax_every, match_teacher_shapes=not args.layer_defaults)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"linearize: {err}") from None

    datamodule = build_datamodule(OmegaConf.create(cfg["data"]))
    datamodule.prepare_data()
    datamodule.setup("fit")
    val_loader = datamodule.val_dataloader()

    def quality(stage: str) -> dict[str, float]:
        metrics = evaluate(model, val_loader, args.eval_batches)
        metrics["bits_per_token"] = metrics["loss"] / math.log(2)
        print(f"linearize: {stage:>14}: val loss {metrics['loss']:.4f}, acc {metrics['acc']:.4f}", flush=True)
        return {"stage": stage, **metrics}

    stages = [quality("teacher")]
    context = int(cfg["data"].get("input_seq_len") or cfg["data"].get("seq_len") or 64)
    decode = {"teacher": decode_cost(model, context)}
    report = LinearizeReport()
    teacher = copy.deepcopy(model).requires_grad_(False)
    try:
        swapped = swap_layers(model, specs, report)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"linearize: {err}") from None
    stages.append(quality("swapped"))
    transfer_started = time.perf_counter()
    report.transfer_losses = attention_transfer(
        model,
        teacher,
        swapped,
        report.fresh,
        _cycle(datamodule.train_dataloader()),
        steps=args.transfer_steps,
        lr=args.transfer_lr,
        warmup_steps=args.transfer_steps // 10,
        report=report,
    )
    transfer_s = time.perf_counter() - transfer_started
    del teacher
    stages.append(quality("transferred"))

    # stage 2 through Lightning: the new run's task, config and trainer, as train.py would build them
    teacher_specs = per_layer(hparams["model"]["attention"], depth)
    new_specs = [dict(t) if s is None else s for s, t in zip(specs, teacher_specs, strict=True)]
    model_cfg = {**hparams["model"], "attention": new_specs}
    scheduler = {**(hparams.get("scheduler") or {})}
    scheduler["warmup_steps"] = min(int(scheduler.get("warmup_steps", 0)), args.finetune_steps // 10)
    teacher_optimizer = hparams.get("optimizer") or {}
    # default: the teacher's own lr (measured on MQAR, gla: 0.735 test accuracy at the teacher's 3e-3 against 0.655
    # at 1e-3, same 200 + 300 steps)
    finetune_lr = float(args.finetune_lr if args.finetune_lr is not None else teacher_optimizer.get("lr", 1e-3))
    optimizer = {**teacher_optimizer, "lr": finetune_lr}
    task = type(teacher_task)(model=model_cfg, optimizer=optimizer, scheduler=scheduler)
    task.model.load_state_dict(model.state_dict())

    out = Path(args.out or f"outputs/linearize/{datetime.now():%Y-%m-%d}/{datetime.now():%H-%M-%S}").expanduser()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    old_dir = str(cfg.get("paths", {}).get("output_dir") or checkpoint.parent.parent)
    run_cfg = _replace_prefix(cfg, old_dir, str(out))
    run_cfg["model"] = {**run_cfg["model"], "attention": [_minimal_spec(s) for s in new_specs]}
    run_cfg["optimizer"], run_cfg["scheduler"] = optimizer, scheduler
    run_cfg["ckpt_path"] = None
    validate_every = max(1, args.finetune_steps // 2)
    run_cfg["trainer"] = {
        **run_cfg["trainer"],
        "max_steps": args.finetune_steps,
        "max_epochs": -1,
        "check_val_every_n_epoch": None,  # validate every val_check_interval optimizer steps, across epochs
        "val_check_interval": validate_every,
    }
    run_cfg.setdefault("paths", {})["output_dir"] = str(out)

    callbacks = [*_instantiate_all(run_cfg.get("callbacks")), ThroughputMonitor()]
    trainer_cfg = {k: v for k, v in run_cfg["trainer"].items()}
    if args.no_progress_bar:
        trainer_cfg["enable_progress_bar"] = False
        callbacks = [c for c in callbacks if "ProgressBar" not in type(c).__name__]
    trainer: L.Trainer = instantiate(
        trainer_cfg,
        callbacks=callbacks,
        logger=_instantiate_all(run_cfg.get("logger")) or False,
        plugins=faults.trainer_plugins(),
    )
    finetune_started = time.perf_counter()
    trainer.fit(task, datamodule=datamodule)
    finetune_s = time.perf_counter() - finetune_started
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    test_results = trainer.test(task, datamodule=datamodule, ckpt_path=best, verbose=False)
    test_metrics = {k: float(v) for k, v in (test_results[0] if test_results else {}).items()}
    faults.export_weights(task, out)
    model = task.model
    stages.append(quality("finetuned"))
    decode["linearized"] = decode_cost(model, context)

    # the saved config composes again: paths point at the run directory that Hydra creates for the resumed run
    saved = _replace_prefix(run_cfg, str(out), OUTPUT_KEY)
    saved["paths"]["output_dir"] = "${hydra:runtime.output_dir}"
    OmegaConf.save(OmegaConf.create(saved), out / "config.yaml")
    # max_steps counts from the start of the fine-tune (the checkpoint's global step), so twice the steps done
    # continues for as many again; Hydra needs the run directory as --config-path (an absolute path)
    last = shlex.quote(f"ckpt_path={out}/checkpoints/last.ckpt")
    resume = (
        f"python train.py --config-path {shlex.quote(str(out))} --config-name config {last} "
        f"trainer.max_steps={2 * trainer.global_step}"
    )
    summary = {
        "config_name": "config",
        "overrides": [],
        "choices": {},
        "model": model_cfg.get("_target_") or model_cfg["name"],
        "attention": [s["name"] for s in new_specs],
        "attention_specs": new_specs,
        "params": sum(p.numel() for p in task.parameters()),
        "test_metrics": test_metrics,
        "val_metrics": {k: v for k, v in fit_metrics.items() if k.startswith("val/")},
        "best_checkpoint": best,
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "wall_time_s": time.perf_counter() - started,
        "output_dir": str(out),
        "linearize": {
            "teacher_checkpoint": str(checkpoint),
            "target": target,
            "keep_softmax_every": args.keep_softmax_every,
            "keep_softmax_layers": sorted(args.keep_softmax_layers or []),
            "transfer_steps": args.transfer_steps,
            "finetune_steps": trainer.global_step,
            "transfer_lr": args.transfer_lr,
            "finetune_lr": finetune_lr,
            "transfer_s": transfer_s,
            "finetune_s": finetune_s,
            "stages": stages,
            "swapped": report.swapped,
            "kept": report.kept,
            "copied": report.copied,
            "fresh": report.fresh,
            "transfer_loss_first_last": report.transfer_losses[:1] + report.transfer_losses[-1:],
            "transfer_layer_errors": report.transfer_layer_errors,
            "decode": decode,
            "resume": resume,
        },
    }
    write_summary(out / "summary.json", summary)
    if args.report:
        print(stage_table(stages))
        for which, cost in decode.items():
            if cost:
                print(
                    f"decode ({which}): {cost['state_numbers']:,} state numbers at {cost['context']} tokens, "
                    f"{cost['ms_per_token']:.2f} ms/token"
                )
    print(
        f"linearize: wrote {out} (summary.json, checkpoints/, model.safetensors)\nresume with: {resume}",
        flush=True,
    )
    return summary


def decode_cost(model: torch.nn.Module, context: int, new_tokens: int = 32, repeats: int = 3) -> dict[str, float]:
    """What decoding one more token costs after ``context`` tokens (batch 1, greedy, the per-layer caches).

    ``state_numbers``: the numbers every attention layer keeps per sequence (``layer.state_size(context)``), summed;
    ``ms_per_token``: median over ``repeats`` of (time to generate ``new_tokens`` - time to generate 1) / (new_tokens
    - 1), so the prompt's prefill cancels out. Empty for a model without ``generate`` (classifiers).
    """
    from attnzoo.models.linearize import attention_layers

    if not hasattr(model, "generate"):
        return {}
    was_training = model.training
    model.eval()
    # a generator of its own: the global RNG (which initialises the swapped layers next) stays untouched
    prompt = torch.randint(0, getattr(model, "vocab_size", 2), (1, context), generator=torch.Generator().manual_seed(0))

    def seconds(count: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, count, temperature=0)
        return time.perf_counter() - start

    seconds(2)  # warm-up: first-call allocations
    times = sorted((seconds(new_tokens) - seconds(1)) / (new_tokens - 1) for _ in range(repeats))
    model.train(was_training)
    state = sum(int(layer.state_size(context)) for _, layer in attention_layers(model))
    return {"context": context, "state_numbers": state, "ms_per_token": 1e3 * times[len(times) // 2]}


def stage_table(stages: list[dict[str, Any]]) -> str:
    """Markdown: validation loss, bits per token and accuracy after every stage."""
    lines = ["| stage | val loss | bits/token | val acc |", "|---|---:|---:|---:|"]
    lines += [f"| {s['stage']} | {s['loss']:.4f} | {s['bits_per_token']:.3f} | {s['acc']:.4f} |" for s in stages]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt inside a softmax run's checkpoints/")
    parser.add_argument("--attention", required=True, help="the target attention (a registered name)")
    parser.add_argument("--option", action="append", default=[], help="a target option key=value (repeatable)")
    parser.add_argument("--keep-softmax-every", type=int, default=None, help="keep every k-th layer softmax")
    parser.add_argument(
        "--keep-softmax-layers", type=int, nargs="+", default=None, help="keep these layers (0-based) softmax"
    )
    parser.add_argument("--layer-defaults", action="store_true", help="keep the target's expand_k/expand_v defaults")
    parser.add_argument("--transfer-steps", type=int, default=200, help="attention-transfer steps (stage 1)")
    parser.add_argument("--finetune-steps", type=int, default=300, help="full fine-tune steps (stage 2)")
    parser.add_argument("--transfer-lr", type=float, default=1e-2, help="stage 1 AdamW lr (LoLCATs: 1e-2)")
    parser.add_argument("--finetune-lr", type=float, default=None, help="stage 2 AdamW lr (default: the run's lr)")
    parser.add_argument("--eval-batches", type=int, default=None, help="validation batches per stage (all: none)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (outputs/linearize/<date>/<time>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (the run's num_threads)")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument("--report", action="store_true", help="print the table of quality after every stage")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.transfer_steps < 0 or args.finetune_steps < 1:
        raise SystemExit(
            f"linearize: --transfer-steps must be >= 0 and --finetune-steps >= 1 (the fine-tune writes the run's "
            f"checkpoints); got {args.transfer_steps} and {args.finetune_steps}."
        )
    return linearize_run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
