"""Run one training command in this process and measure it the same way for every tool (lorakit, LLaMA-Factory, TRL):
all three train through a transformers `Trainer` subclass, so a patch of `Trainer.training_step` sees every batch
actually consumed, whatever collator, packing or template the tool uses.

    python measure.py --result OUT.json -- -m lora_kit.cli sft ...      (a module, like python -m)
    python measure.py --result OUT.json -- script.py args ...           (a script)

Writes OUT.json: non-padding tokens consumed, training time (first to last optimizer step's end, i.e. `train()`),
wall time of the whole command, peak RSS (this process and its children: datasets map workers), CUDA peak allocated
memory, per-step losses. Uses only the standard library and transformers, so it runs in each tool's own venv.

Non-padding tokens, per batch: with a 2-D attention mask, its non-zero entries (LLaMA-Factory's neat_packing puts
segment numbers 1, 2, ... there); otherwise (packed rows with position_ids, padding-free rows, 4-D masks) each row's
length less its trailing run of pad tokens (all collators here pad on the right; a row's own final EOS, when EOS is the
pad token as in SmolLM2, is lost too: at most one token per row, the same for every tool).
"""
from __future__ import annotations

import json
import resource
import runpy
import sys
import time


def _row_tokens(ids, pad_id) -> int:
    n = len(ids)
    if pad_id is None:
        return n
    while n and ids[n - 1] == pad_id:
        n -= 1
    return n


def count_tokens(inputs: dict, pad_id) -> int:
    mask = inputs.get("attention_mask")
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
        return int((mask != 0).sum())
    ids = inputs["input_ids"]
    return sum(_row_tokens(row, pad_id) for row in ids.tolist())


def _pad_id(trainer):
    for src in (getattr(trainer, "processing_class", None), getattr(trainer, "tokenizer", None)):
        tok = getattr(src, "tokenizer", src)  # a processor wraps its tokenizer
        if getattr(tok, "pad_token_id", None) is not None:
            return tok.pad_token_id
    model = getattr(trainer, "model", None)
    return getattr(getattr(model, "config", None), "pad_token_id", None)


def install(stats: dict) -> None:
    import transformers

    step, train = transformers.Trainer.training_step, transformers.Trainer.train

    def training_step(self, model, inputs, *args, **kwargs):
        stats["tokens"] += count_tokens(inputs, _pad_id(self))
        stats["rows"] += int(inputs["input_ids"].shape[0])
        stats["padded_positions"] += int(inputs["input_ids"].numel())
        loss = step(self, model, inputs, *args, **kwargs)
        stats["losses"].append(float(loss.detach().float().mean()))
        return loss

    def timed_train(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return train(self, *args, **kwargs)
        finally:
            stats["train_s"] = time.perf_counter() - start

    transformers.Trainer.training_step = training_step
    transformers.Trainer.train = timed_train


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) < 3 or argv[0] != "--result" or argv[2] != "--":
        sys.exit(__doc__)
    result, target = argv[1], argv[3:]
    stats = {"tokens": 0, "rows": 0, "padded_positions": 0, "losses": [], "train_s": None}
    start = time.perf_counter()
    install(stats)
    code = 0
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    stats["wall_s"] = time.perf_counter() - start
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    stats["peak_rss_mb"] = rss / 1024  # Linux reports KiB
    try:
        import torch

        if torch.cuda.is_available():
            stats["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    stats["exit_code"] = code
    with open(result, "w", encoding="utf-8") as f:
        json.dump(stats, f)
    sys.exit(code)


if __name__ == "__main__":
    main()
