"""`lorakit eval`: exact-match accuracy of greedy answers on a held-out task split (bundled zh tasks or any alpaca/
sharegpt file), and bits per character on a text file. Prompts are rendered with the training template.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lora_kit.data.records import conversations, read_records
from lora_kit.data.zh_tasks import TASKS, held_out
from lora_kit.models.load import load_for_inference
from lora_kit.rundir import write_json
from lora_kit.templates import prompt_ids, resolve

_TRAILING = re.compile(r"[\s。.!！,，]+$")


def normalise(text: str) -> str:
    """The answer as compared by exact match: whitespace and trailing punctuation (。.!！,，) stripped."""
    return _TRAILING.sub("", text.strip())


@torch.no_grad()
def generate_answers(model, tokenizer, template, prompts: list[list[dict]], *, max_new_tokens: int = 32,
                     batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy answers for conversations ending in a user turn; batched with left padding."""

    encoded = [prompt_ids(tokenizer, template, msgs) for msgs in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    answers: list[str] = [""] * len(encoded)
    pad = tokenizer.pad_token_id
    dev = next(model.parameters()).device
    bar = tqdm(total=len(order), desc="generate", disable=not progress, unit="prompt")
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in idx], device=dev)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx], device=dev)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row, i in zip(out, idx):
            answers[i] = tokenizer.decode(row[width:], skip_special_tokens=True)
        bar.update(len(idx))
    bar.close()
    return answers


def task_records(task_or_file: str):
    """(prompts, references) from a bundled task name or a data file (last assistant turn is the reference)."""
    source = str(held_out(task_or_file)) if task_or_file in TASKS else task_or_file
    convs, _ = conversations(read_records(source))
    prompts = [msgs[:-1] for _, msgs in convs]
    refs = [msgs[-1]["content"] for _, msgs in convs]
    return prompts, refs


def accuracy(model, tokenizer, template, task: str, limit: int = 0, batch_size: int = 8,
             max_new_tokens: int = 32) -> dict:
    """Exact-match accuracy of greedy answers on a bundled task or SFT file, with five example answers."""
    prompts, refs = task_records(task)
    if limit:
        prompts, refs = prompts[:limit], refs[:limit]
    answers = generate_answers(model, tokenizer, template, prompts, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    hits = [normalise(a) == normalise(r) for a, r in zip(answers, refs)]
    return {"task": task, "n": len(hits), "accuracy": sum(hits) / len(hits),
            "examples": [{"answer": a, "reference": r} for a, r in list(zip(answers, refs))[:5]]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `lorakit eval`: model or adapter, task or text file, batch and generation limits."""
    p.add_argument("--model", help="base model (alias, dir, hub id); default: the adapter's base")
    p.add_argument("--adapter", help="LoRA adapter directory written by a lorakit stage")
    p.add_argument("--task", default="sentiment", help="bundled task (sentiment, segment) or an alpaca/sharegpt file")
    p.add_argument("--text", help="instead of a task: report bits per character on this text file")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N records")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--template", help="override the prompt template (default: the adapter's training template)")
    p.add_argument("--output", help="also write the result as JSON here")


def main(args) -> int:
    """`lorakit eval`: print (and optionally write) task accuracy, or bits per character of a text file."""
    model, tokenizer, template_name = load_for_inference(args.model, args.adapter, dtype=args.dtype)
    if args.text:
        from lora_kit.data.corpora import iter_lines
        from lora_kit.evaluate.bpc import bits_per_char

        result = {"text": args.text, "bits_per_char": bits_per_char(model, tokenizer, list(iter_lines(args.text)))}
        print(f"bits per character on {args.text}: {result['bits_per_char']:.4f}")
    else:
        template = resolve(args.template or template_name, tokenizer)
        result = accuracy(model, tokenizer, template, args.task, args.limit, args.batch_size, args.max_new_tokens)
        for ex in result["examples"][:3]:
            print(f"  answer {ex['answer']!r}  reference {ex['reference']!r}")
        print(f"{args.task}: exact-match accuracy {result['accuracy']:.3f} on {result['n']} held-out records"
              f" ({'adapter ' + args.adapter if args.adapter else 'base model'})")
    result.update(model=args.model, adapter=args.adapter)
    if args.output:
        write_json(Path(args.output), result)
    return 0
