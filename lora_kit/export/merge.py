"""`lorakit merge`: fold LoRA adapters (in order) into the base weights, streamed tensor by tensor, verified, atomic.

Output: a plain transformers model directory (or a GGUF file) with the adapters' tokenizer, trained embedding rows and
heads; logits are checked against base + adapters before the directory appears.

`--rows-only` folds only what a LoRA adapter cannot carry for engines that serve LoRA factors alone (vLLM refuses
trained token rows and saved modules): OUT is the base with the trained rows and modules, OUT/adapter the last
adapter's LoRA factors over it, so adapters stay hot-swappable over an extended vocabulary.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from lora_kit.errors import LorakitError
from lora_kit.export import llamacpp
from lora_kit.export.common import (
    DTYPES,
    Adapter,
    Checkpoint,
    adapter_tokenizer_dir,
    bound_allocator,
    find_base,
    new_token_ids,
    parse_size,
    read_adapter,
    release_memory,
    tensor_nbytes,
    write_adapter,
    write_safetensors_stream,
)
from lora_kit.export.gguf import GGUF_TYPES, export_gguf
from lora_kit.export.ollama import modelfile, training_template
from lora_kit.export.verify import compare, model_logits, probe_batch, reference_logits, ulp_step
from lora_kit.models.load import adapter_tokenizer_template, signature
from lora_kit.rundir import atomic_dir, check_writable, read_run, run_info, write_json, write_text


def add_arguments(p) -> None:
    """Options of `lorakit merge`: adapters to chain, base, output format, dtype and shard size."""
    p.add_argument("--model", help="base model (default: the first adapter's run.json base_model)")
    p.add_argument("--adapter", action="append", required=True, help="adapter directory; repeat to chain, in order")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: the base model's)")
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="transformers directory or one GGUF file")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16",
                   help="GGUF tensor type; q4_k_m, q5_k_m and q6_k are quantized by llama.cpp (pip install "
                        "'lorakit[gguf]')")
    p.add_argument("--ollama", action="store_true",
                   help="with --format gguf: also write DIR/Modelfile (the training template as Ollama's TEMPLATE, "
                        "its system text, stops, lorakit chat's sampling) for `ollama create NAME -f DIR/Modelfile`")
    p.add_argument("--rows-only", action="store_true",
                   help="fold only trained token rows and saved modules into the base; keep the last adapter's LoRA "
                        "factors as OUT/adapter (what vLLM serves over an extended vocabulary)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def main(args) -> int:
    """`lorakit merge`: fold the adapters into the base weights, verify the logits, then move the output in place."""
    out = Path(args.output)
    check_writable(out, args.force)
    if args.ollama and args.format != "gguf":
        raise LorakitError("--ollama writes a Modelfile beside a GGUF file: add --format gguf")
    if args.format == "gguf" and args.gguf_type in llamacpp.KQUANTS:
        llamacpp.require(f"--gguf-type {args.gguf_type}")  # refused before anything is merged
    bound_allocator()
    adapters = [Path(a) for a in args.adapter]
    for a in adapters:
        if not (a / "adapter_config.json").is_file():
            raise LorakitError(f"{a}: not an adapter directory (no adapter_config.json)")
    base = Path(find_base(adapters, args.model))
    if not base.is_dir():
        base = Path(snapshot_download(str(base), allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    loaded = [read_adapter(a) for a in adapters]
    task = "SEQ_CLS" if any(a.task_type == "SEQ_CLS" for a in loaded) else "CAUSAL_LM"
    template = None
    if args.ollama:  # the template the adapters trained with, refused before anything is merged if Go cannot say it
        name = adapter_tokenizer_template(str(adapters[-1]), str(base))[1]
        template = training_template(AutoTokenizer.from_pretrained(adapter_tokenizer_dir(adapters, base)), name,
                                     adapters[-1])
    kept = rows_only_factors(loaded[-1], task, args.format) if args.rows_only else None
    folded = loaded[:-1] + [dataclasses.replace(loaded[-1], lora={})] if args.rows_only else loaded
    ckpt = Checkpoint(base)
    dtype = DTYPES[args.dtype] if args.dtype else ckpt.dtype()
    print(f"lorakit merge: {base} + {' + '.join(map(str, adapters))} -> {out} ({str(dtype)[6:]}, {args.format})")

    with atomic_dir(out, force=True) as tmp:
        work = tmp if args.format == "hf" else Path(tempfile.mkdtemp(prefix=".merge-hf-", dir=tmp.parent))
        try:
            tok, config = write_merged(ckpt, folded, work, dtype, parse_size(args.shard_size), task, adapters)
            if kept is not None:
                write_lora_only(work / "adapter", kept, loaded[-1], out, work, tok)
            result = verify(base, adapters, work, task, dtype, tok, loaded, rows_only=kept is not None)
            info = dict(adapters=[str(a) for a in adapters], dtype=str(dtype)[6:], format=args.format,
                        task_type=task, verification=result, rows_only=kept is not None)
            if args.format == "gguf":
                gguf_file, checks = export_gguf(work, tmp, args.gguf_type, name=out.name)
                info.update(gguf_file=gguf_file.name, gguf_type=args.gguf_type, gguf_checks=checks)
                if template is not None:
                    context = int(getattr(config, "max_position_embeddings", None) or 2048)
                    write_text(tmp / "Modelfile", modelfile(gguf_file.name, tok, template, context))
                    info["ollama_modelfile"] = "Modelfile"
        finally:
            if work != tmp:
                shutil.rmtree(work, ignore_errors=True)
        write_json(tmp / "run.json", run_info("merge", str(base), new_token_ids=new_token_ids(adapters), **info))
    print(f"lorakit merge: wrote {out}")
    return 0


def rows_only_factors(last: Adapter, task: str, fmt: str) -> dict:
    """The LoRA factors `--rows-only` keeps as an adapter (all of the last adapter's; one rank, as PEFT stores)."""
    if fmt != "hf" or task != "CAUSAL_LM":
        raise LorakitError("--rows-only writes a transformers directory of a causal LM (not --format gguf, not a "
                           "reward model)")
    if not last.lora:
        raise LorakitError(f"{last.path}: no LoRA factors to keep as an adapter; merge it without --rows-only")
    ranks = {f.A.shape[0] for f in last.lora.values()}
    if len(ranks) > 1:
        raise LorakitError(f"{last.path}: LoRA factors of several ranks {sorted(ranks)}; --rows-only writes one rank")
    if not last.rows and not last.full:
        print(f"lorakit merge: {last.path} trains no token rows or saved modules; OUT/adapter is its LoRA as it was")
    return last.lora


def write_lora_only(dst: Path, lora: dict, last: Adapter, out: Path, work: Path, tok) -> None:
    """OUT/adapter: the LoRA factors over the rows-merged base at `out`, with the tokenizer, recipe and run.json a
    lorakit stage writes, so `lorakit chat/serve --adapter OUT/adapter` and plain peft load it."""
    dst.mkdir()
    write_adapter(dst, lora, next(iter(lora.values())).A.shape[0], task_type=last.task_type,
                  base_model=str(out.resolve()), fan_in_fan_out=bool(last.config.get("fan_in_fan_out")))
    tok.save_pretrained(dst)
    if (last.path / "recipe.yaml").is_file():
        shutil.copy2(last.path / "recipe.yaml", dst / "recipe.yaml")
    stage = read_run(last.path).get("stage", "sft")
    write_json(dst / "run.json", run_info(stage, str(out.resolve()), rows_folded_from=str(last.path),
                                          base_signature=signature(AutoConfig.from_pretrained(work)),
                                          new_token_ids=read_run(last.path).get("new_token_ids") or []))


def write_merged(ckpt: Checkpoint, adapters: list[Adapter], dst: Path, dtype: torch.dtype, shard_size: int,
                 task: str, adapter_dirs: list[Path]):
    """Write merged safetensors shards, config and the adapters' tokenizer into `dst`; return (tokenizer, config)."""
    config = AutoConfig.from_pretrained(ckpt.path)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    touched = set().union(*(a.touched() for a in adapters))
    source = {k: k for k in ckpt.keys}
    if task == "SEQ_CLS":  # a reward model: the scalar `score` head replaces the LM head
        source = {k: v for k, v in source.items() if not k.startswith("lm_head.")}
    embed_key = next((k for k in ckpt.keys if k.endswith("embed_tokens.weight")), None)
    if tied and "lm_head.weight" in touched and "lm_head.weight" not in source and embed_key:
        source["lm_head.weight"] = embed_key  # LoRA on a tied head: the head becomes its own weight
        tied = False
    full = {k: t for a in adapters for k, t in a.full.items()}
    for k in touched - set(source):
        if k not in full:
            owner = next(a.path for a in adapters if k in a.touched())
            raise LorakitError(f"{owner}: adapter weight {k} has no counterpart in base model {ckpt.path}; "
                               "the adapter was trained on another model")
        source[k] = None  # a new module (e.g. the reward head) taken whole from the adapter

    def shape_of(k):
        return list(full[k].shape) if source[k] is None else ckpt.meta(source[k])[0]

    def dtype_of(k):
        src = full[k].dtype if source[k] is None else ckpt.meta(source[k])[1]
        return dtype if src.is_floating_point else src

    plan, shards, size = [(k, shape_of(k), dtype_of(k)) for k in source], [[]], 0
    for item in plan:
        n = tensor_nbytes(item[1], item[2])
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    bar = tqdm(total=sum(tensor_nbytes(s, d) for _, s, d in plan), unit="B", unit_scale=True, desc="merge")

    def produce(key):
        w = full[key].clone() if source[key] is None else ckpt.get(source[key])
        if key in touched:
            w = w.float()
            for a in adapters:
                w = a.apply(key, w)
            if not torch.isfinite(w).all():
                raise LorakitError(f"merged weight {key} has non-finite values; an adapter holds NaN/inf")
        out = w.to(dtype_of(key))
        bar.update(tensor_nbytes(out.shape, out.dtype))
        return out

    weight_map = {}
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, items in zip(names, shards):
        write_safetensors_stream(dst / name, items, produce)
        ckpt.close()
        release_memory()
        weight_map.update({k: name for k, _, _ in items})
    bar.close()
    if len(shards) > 1:
        total = sum(tensor_nbytes(s, d) for _, s, d in plan)
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    tok = AutoTokenizer.from_pretrained(adapter_tokenizer_dir(adapter_dirs, ckpt.path))
    rows = shape_of(embed_key)[0] if embed_key else len(tok)
    if len(tok) > rows:
        raise LorakitError(f"tokenizer has {len(tok)} tokens but {ckpt.path} has {rows} embedding rows; merge into "
                           "the extended model written by `lorakit extend-vocab`")
    tok.save_pretrained(dst)
    config.dtype = dtype
    config.vocab_size = rows
    config.tie_word_embeddings = tied
    if task == "SEQ_CLS":
        config.architectures = [a.replace("ForCausalLM", "ForSequenceClassification")
                                for a in config.architectures or []]
        config.num_labels = 1
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config.save_pretrained(dst)
    if (ckpt.path / "generation_config.json").is_file() and task != "SEQ_CLS":
        shutil.copy2(ckpt.path / "generation_config.json", dst / "generation_config.json")
    return tok, config


def verify(base: Path, adapters: list[Path], merged: Path, task: str, dtype: torch.dtype, tok,
           loaded: list[Adapter], rows_only: bool = False) -> dict:
    """Logits of the merged model (with `rows_only`: of merged/adapter over it, by PEFT) against base + adapters (PEFT,
    unmerged) on a probe batch; fails outside tolerance."""
    rows = json.loads((merged / "config.json").read_text())["vocab_size"]
    ids = probe_batch(tok, rows, new_token_ids(adapters))
    pad = tok.pad_token_id
    # Everything computed in fp32 (one block at a time, as the merge's own fp32 arithmetic): a bf16 reference differs
    # from the exact one by more than the merge's rounding does (SmolLM2 + 2,000 rows: 3.7 against 0.41), so comparing
    # two bf16 forward passes tests bf16 arithmetic, not the merge. The tolerance is the measured effect of one ulp.
    ref, bare = reference_logits(base, adapters, task, ids, pad, earlier=loaded[:-1])
    out = model_logits(merged, task, ids, pad)
    stepped = model_logits(merged, task, ids, pad, transform=ulp_step(dtype)) if dtype != torch.float32 else None
    if rows_only:  # the rows-merged base's own rounding effect, carried over to it with the LoRA-only adapter on top
        plain, out = out, reference_logits(merged, [merged / "adapter"], task, ids, pad)[0]
        stepped = None if stepped is None else out + (stepped - plain)
    res = compare(ref, bare, out, dtype, stepped)
    print(f"lorakit merge: verification on {tuple(ids.shape)} probe tokens: max |merged - (base + adapters)| = "
          f"{res['max_abs_diff']:.3g} (tolerance {res['tolerance']:.3g}: one {res['dtype']} ulp on every weight moves "
          f"logits by {res['ulp_effect']:.3g}; the last adapter moves them by up to {res['adapter_effect']:.3g})")
    if res["adapter_effect"] <= res["tolerance"]:
        print("lorakit merge: warning: the adapter changes logits less than the tolerance, so this check cannot tell "
              "a correct merge from a missing one; merge with --dtype fp32 for an exact check")
    if not res["ok"]:
        raise LorakitError(f"verification failed: merged logits differ from base + adapters by "
                           f"{res['max_abs_diff']:.3g} > {res['tolerance']:.3g}; nothing was written")
    return res
