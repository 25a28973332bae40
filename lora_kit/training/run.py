"""What every training stage shares around the library trainer: output layout and resume rules, TrainingArguments from
a recipe, metrics.jsonl + progress bar + loss.png callbacks, NaN guard, and the final save of
adapter/tokenizer/run.json.

Layout of an output_dir: adapter at the root, tokenizer, recipe.yaml, run.json (written last: marks a finished run),
metrics.jsonl, loss.png, checkpoints/checkpoint-N (resumable).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import matplotlib
import matplotlib.pyplot as plt
import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, TrainerState
from transformers.trainer_callback import ProgressCallback as HFProgress

from lora_kit.errors import LorakitError
from lora_kit.models.load import check_checkpoint, device, load_tokenizer, resolve_model, signature
from lora_kit.recipe import dump_yaml
from lora_kit.rundir import (  # noqa: F401 (is_main_process: the stages import it from here)
    CHECKPOINTS,
    RunDir,
    finish,
    is_main_process,
    log_metrics,
    newest_checkpoint,
    read_metrics,
    run_info,
    write_json,
    write_text,
)
from lora_kit.templates import resolve
from lora_kit.training.interrupt import StopCallback


# ---------------------------------------------------------------------------------------------------- output dir
def prepare_output(cfg) -> tuple[Path, Optional[str]]:
    """Claim output_dir for this run under rundir.RunDir's rules (resume/force, lock, previous run kept until the new
    one has a result); return (path, checkpoint to resume from or None)."""
    if not cfg.output_dir:
        raise LorakitError("output_dir is required (output_dir=DIR)")
    out = Path(cfg.output_dir)
    recipe = yaml.safe_load(dump_yaml(cfg)) if dataclasses.is_dataclass(cfg) else None
    ckpt = RunDir.claim(out, force=cfg.force, resume=cfg.resume, recipe=recipe, writer=is_main_process()).checkpoint
    if cfg.resume and not cfg.force:
        if ckpt is None:
            print(f"lorakit: resume=true but {out} has no checkpoint yet; starting from the beginning", flush=True)
        else:
            print(f"lorakit: resuming from {ckpt}", flush=True)
            trim_metrics(out, ckpt)
    return out, ckpt


def open_run(cfg):
    """What every chat-style stage does first: check output_dir (resume/force), resolve the base model, load its
    tokenizer and pick the prompt template. Returns (out, checkpoint or None, base, tokenizer, template)."""
    out, ckpt = prepare_output(cfg)
    base = resolve_model(cfg.model)
    tokenizer = load_tokenizer(base, cfg.trust_remote_code)
    return out, ckpt, base, tokenizer, resolve(cfg.template, tokenizer)


def run_trainer(trainer, checkpoint: Optional[str]) -> None:
    """trainer.train(resume_from_checkpoint=checkpoint), the one way every Trainer stage trains. A checkpoint at
    max_steps (killed after the last checkpoint, before the final save) already holds the result: the Trainer would
    resume mid-epoch and take one more step (it checks max_steps only after a step), so its weights and state are
    loaded instead. Under DeepSpeed or FSDP, whose checkpoints only their engine reads, the Trainer resumes as usual."""
    if checkpoint:
        check_checkpoint(checkpoint)
    sharded = getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)
    if checkpoint and not sharded:
        state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        if 0 < trainer.args.max_steps <= state.global_step:
            trainer._load_from_checkpoint(checkpoint)
            trainer.state = state
            return
    trainer.train(resume_from_checkpoint=checkpoint)


def trim_metrics(out: Path, checkpoint: Optional[str]) -> None:
    """On resume, forget metrics logged after the checkpoint (they will be logged again): everything when there is no
    checkpoint (step-0 evaluations too), and end-of-run rows logged after the last checkpoint at the same step (the
    trainer's summary, pretrain's evaluation after a phase)."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file() or not is_main_process():
        return
    step = int(Path(checkpoint).name[len("checkpoint-"):]) if checkpoint else -1
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut off by a kill
        if row.get("step", 0) <= step and "train_loss" not in row and row.get("when") != "after":
            keep.append(line)
    write_text(path, "".join(l + "\n" for l in keep))


# ---------------------------------------------------------------------------------------------------- arguments
def precision_flags(dtype: torch.dtype) -> dict:
    """TrainingArguments' bf16/fp16 switches for the compute dtype."""
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def training_arguments(cfg, out: Path, dtype: torch.dtype, args_class=None, **extra):
    """TrainingArguments (or a subclass such as TRL's RewardConfig/DPOConfig via `args_class`) from a recipe."""

    kw = dict(
        output_dir=str(out / CHECKPOINTS), max_steps=cfg.max_steps, save_steps=cfg.save_steps,
        logging_steps=cfg.logging_steps, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=int(math.ceil(cfg.warmup_ratio * cfg.max_steps)), weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, data_seed=cfg.seed, report_to=_report_to(cfg.report_to),
        save_strategy="steps", save_total_limit=2, remove_unused_columns=False,
        dataloader_num_workers=cfg.dataloader_workers, include_num_input_tokens_seen="non_padding",
        disable_tqdm=False, use_cpu=device() == "cpu",
        ddp_backend="gloo" if device() == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False, logging_nan_inf_filter=False,  # NaN must reach MetricsCallback
        **precision_flags(dtype))
    kw.update(extra)
    if kw["report_to"] != "none":  # tensorboard logs go beside the run, not inside checkpoints/
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "logs"))
    return (args_class or TrainingArguments)(**kw)


def _report_to(value: str):
    items = [v.strip() for v in value.split(",") if v.strip() and v.strip() != "none"]
    return items or "none"


# ---------------------------------------------------------------------------------------------------- callbacks
class MetricsCallback(TrainerCallback):
    """Appends one JSON object per logging step to metrics.jsonl (rank 0) with step, loss, lr and tokens/s, and
    stops the run on a NaN/Inf loss, naming the step and the last good checkpoint."""

    def __init__(self, out: Path, phase: Optional[str] = None):
        self.path = Path(out) / "metrics.jsonl"
        self.phase = phase
        self.last = None  # (time, tokens)
        self.latest: dict = {}

    def on_train_begin(self, args, state, control, **kw):
        self.last = (time.time(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        now, tokens = time.time(), state.num_input_tokens_seen
        if self.last and "loss" in logs:
            dt = max(now - self.last[0], 1e-9)
            logs["tokens_per_s"] = round((tokens - self.last[1]) / dt, 1)
            self.last = (now, tokens)
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            last = newest_checkpoint(Path(args.output_dir).parent)
            raise LorakitError(f"loss is {loss} at step {state.global_step}; stopped. Last good checkpoint: "
                               f"{last or 'none'} (lower learning_rate, check the data, then resume=true)")
        row = {"step": state.global_step, **({"phase": self.phase} if self.phase else {}),
               **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in logs.items()}}
        if "learning_rate" in row:
            row["lr"] = row.pop("learning_rate")
        self.latest.update(row)
        log_metrics(self.path, row)


class ProgressCallback(TrainerCallback):
    """One tqdm bar per run showing loss, learning rate, tokens/s and ETA (replaces the trainer's default bar)."""

    def __init__(self, metrics: MetricsCallback, desc: str = "train"):
        self.metrics, self.desc, self.bar = metrics, desc, None

    def on_train_begin(self, args, state, control, **kw):
        if is_main_process():
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if self.bar is not None:
            m = self.metrics.latest
            post = {}
            if "loss" in m:
                post["loss"] = f"{m['loss']:.4f}"
            if "lr" in m:
                post["lr"] = f"{m['lr']:.2e}"
            if "tokens_per_s" in m:
                post["tok/s"] = f"{m['tokens_per_s']:.0f}"
            self.bar.set_postfix(post, refresh=True)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()


def final_eval(trainer, key: str) -> dict:
    """The evaluation at the last step if the trainer just ran one (eval_steps divides max_steps), else a new one."""
    done = [h for h in trainer.state.log_history if key in h]
    if done and done[-1].get("step") == trainer.state.global_step:
        return done[-1]
    return trainer.evaluate()  # logged to metrics.jsonl by the callback as well


def install_callbacks(trainer, out: Path, phase: Optional[str] = None, desc: str = "train") -> MetricsCallback:
    """Replace the trainer's default printer and progress bar with lorakit's metrics.jsonl writer and bar, and stop
    at a step boundary with a checkpoint on SIGINT/SIGTERM (interrupt.py)."""
    trainer.remove_callback(HFProgress)
    trainer.remove_callback(PrinterCallback)
    metrics = MetricsCallback(out, phase)
    trainer.add_callback(metrics)
    trainer.add_callback(ProgressCallback(metrics, desc))
    trainer.add_callback(StopCallback())
    return metrics


# ---------------------------------------------------------------------------------------------------- plots and save
def plot_metrics(out: Path, keys=("loss", "eval_loss"), panels: bool = False) -> Optional[Path]:
    """loss.png from metrics.jsonl (one line per key that appears); `panels` gives each key its own axes (for
    metrics on different scales, e.g. PPO's reward, KL and response length)."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file() or not is_main_process():
        return None
    rows = read_metrics(path)

    matplotlib.use("Agg")

    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    if panels:
        cols = min(3, len(series))
        nrows = -(-len(series) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
        for ax, (key, pts) in zip(axes.flat, series.items()):
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
            ax.set_title(key, fontsize=9)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(series):]:
            ax.axis("off")
        fig.suptitle(Path(out).name)
        fig.tight_layout()
        return _save_png(fig, Path(out) / "loss.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, pts in series.items():
        ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_title(Path(out).name)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save_png(fig, Path(out) / "loss.png")


def _save_png(fig, target: Path) -> Path:
    tmp = target.with_name(".loss.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, target)
    return target


def wait_for_everyone() -> None:
    """Across processes: block until every rank gets here (no-op in one process), e.g. until rank 0 has written files
    the others read next."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_run(out: Path, model, tokenizer, cfg, stage: str, base_model: str, trainer=None, **info) -> Path:
    """Final artifacts at the root of output_dir; run.json last, so it marks a complete run. Rank 0 writes, the others
    wait until it has. Pass `trainer` under DeepSpeed ZeRO-3 or FSDP: every rank then gathers the sharded weights."""
    state_dict = sharded_state_dict(trainer)
    if not is_main_process():
        wait_for_everyone()
        return out
    out.mkdir(parents=True, exist_ok=True)
    kw = {"state_dict": state_dict} if state_dict else {}
    if "ref" in getattr(model, "peft_config", {}):  # TRL's frozen copy of the starting adapter (DPO, GRPO): not kept
        kw["selected_adapters"] = ["default"]
    model.save_pretrained(out, safe_serialization=True, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_text(out / "recipe.yaml", dump_yaml(cfg))
    plot_metrics(out)

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    info.setdefault("base_signature", signature(base.config))
    write_json(out / "run.json", run_info(stage, base_model, seed=cfg.seed, **info))
    finish(out)
    wait_for_everyone()
    return out


def sharded_state_dict(trainer) -> Optional[dict]:
    """The full state dict, gathered on every rank, when the trainer's engine shards parameters (DeepSpeed ZeRO-3,
    FSDP); None otherwise (each rank then holds the whole model and rank 0 saves it directly)."""
    if trainer is None:
        return None
    ds = getattr(trainer, "is_deepspeed_enabled", False) and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if not ds and not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped if ds else trainer.model)
