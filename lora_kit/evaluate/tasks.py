"""Generation tasks: greedy answers to a held-out split (the bundled zh tasks or any alpaca/sharegpt file), scored
the way each task is measured: segmentation by word P/R/F1, sentiment by accuracy, any file by exact match + char F1.
"""
from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from lora_kit.data.records import conversations, read_records
from lora_kit.data.zh_tasks import TASKS, held_out
from lora_kit.evaluate.scores import exact_match, mean_char_f1, segmentation_prf
from lora_kit.templates import prompt_ids

MAX_NEW_TOKENS = {"sentiment": 8, "segment": 96}  # 正面/负面 is 2-4 tokens; a 30-character sentence with spaces ~80


@torch.no_grad()
def generate_answers(model, tokenizer, template, prompts: list[list[dict]], *, max_new_tokens: int = 32,
                     batch_size: int = 8, progress: bool = True,
                     encoded: Optional[list[list[int]]] = None) -> list[str]:
    """Greedy answers for conversations ending in a user turn; batched with left padding. `encoded`: the prompts'
    generation-prompt ids when the caller already has them (cut to a stage's cutoff_len), else encoded here."""
    if encoded is None:
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


def task_scores(task: str, answers: list[str], refs: list[str]) -> dict:
    """The task's own measures: segment -> word P/R/F1, sentiment -> accuracy, a file -> exact match + char F1."""
    if task == "segment":
        return {**segmentation_prf(answers, refs), "exact_match": exact_match(answers, refs)}
    if task == "sentiment":
        return {"accuracy": exact_match(answers, refs)}
    return {"exact_match": exact_match(answers, refs), "char_f1": mean_char_f1(answers, refs)}


def score_task(model, tokenizer, template, task: str, *, limit: int = 0, batch_size: int = 8,
               max_new_tokens: int = 0, progress: bool = True) -> dict:
    """Generate answers to the first `limit` (0 = all) held-out records of `task` and score them."""
    prompts, refs = task_records(task)
    if limit:
        prompts, refs = prompts[:limit], refs[:limit]
    answers = generate_answers(model, tokenizer, template, prompts, batch_size=batch_size, progress=progress,
                               max_new_tokens=max_new_tokens or MAX_NEW_TOKENS.get(task, 32))
    return {"task": task, "n": len(refs), **task_scores(task, answers, refs),
            "examples": [{"answer": a, "reference": r} for a, r in list(zip(answers, refs))[:5]]}
