"""Named evaluation suites and the side-by-side table: every column (a model, or a base + adapter) measured on the same
held-out texts and tasks, reported as one markdown table, a JSON file and a bar chart.

The `zh` suite: Chinese and English bits/char (English is the forgetting measure), tokens per character, the bundled
held-out tasks and, given a CMMLU directory, a CMMLU subset.
"""
from __future__ import annotations

import gc
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

import matplotlib
import matplotlib.pyplot as plt

from lora_kit.data.corpora import iter_lines
from lora_kit.data.records import bundled_path, read_records
from lora_kit.data.zh_tasks import TASKS, held_out
from lora_kit.errors import LorakitError
from lora_kit.evaluate.bpc import score_documents
from lora_kit.evaluate.choice import evaluate_benchmark
from lora_kit.evaluate.tasks import score_task
from lora_kit.models.builder import load_for_inference
from lora_kit.rundir import write_json, write_text
from lora_kit.templates import resolve

# one subject per CMMLU category (STEM, Humanities, Social Science, Other, China specific): a cheap, balanced subset
CMMLU_SUBSET = ["college_mathematics", "chinese_history", "economics", "nutrition", "chinese_food_culture"]
# metric -> (label, higher is better)
METRICS = {
    "zh_bits_per_char": ("zh bits/char", False),
    "en_bits_per_char": ("en bits/char (forgetting)", False),
    "zh_tokens_per_char": ("zh tokens/char", False),
    "en_tokens_per_char": ("en tokens/char", False),
    "sentiment_accuracy": ("sentiment accuracy", True),
    "segment_f1": ("segmentation word F1", True),
    "cmmlu_accuracy": ("CMMLU accuracy", True),
}
SUITES = {"zh": list(METRICS)}


def zh_texts() -> list[str]:
    """Held-out Chinese text: the inputs of the bundled held-out task splits (reviews and news sentences)."""
    return [r.data["input"] for task in TASKS for r in read_records(str(held_out(task)))]


def en_texts() -> list[str]:
    """Held-out English text written for this project (data/en_heldout.jsonl): the forgetting measure."""
    return list(iter_lines(str(bundled_path("en_heldout"))))


def _column(name: str, model: Optional[str], adapter: Optional[str], *, limit: int, cmmlu, batch_size: int,
            shots: int, dtype: str, progress: bool) -> tuple[dict, dict]:
    net, tokenizer, template_name = load_for_inference(model, adapter, dtype=dtype)
    template = resolve(template_name, tokenizer)
    metrics, counts = {}, {}
    for lang, texts in (("zh", zh_texts()), ("en", en_texts())):
        s = score_documents(net, tokenizer, texts, batch_size=batch_size)
        metrics[f"{lang}_bits_per_char"] = s.bits_per_char
        metrics[f"{lang}_tokens_per_char"] = s.tokens / s.chars
        counts[f"{lang}_bits_per_char"] = counts[f"{lang}_tokens_per_char"] = s.chars
    sentiment = score_task(net, tokenizer, template, "sentiment", limit=limit, batch_size=batch_size,
                           progress=progress)
    segment = score_task(net, tokenizer, template, "segment", limit=limit, batch_size=batch_size, progress=progress)
    metrics["sentiment_accuracy"], counts["sentiment_accuracy"] = sentiment["accuracy"], sentiment["n"]
    metrics["segment_f1"], counts["segment_f1"] = segment["f1"], segment["n"]
    if cmmlu:
        res = evaluate_benchmark(net, tokenizer, "cmmlu", cmmlu, shots=shots, subjects=CMMLU_SUBSET, limit=limit,
                                 batch_size=batch_size, progress=progress)
        metrics["cmmlu_accuracy"], counts["cmmlu_accuracy"] = res["accuracy"], res["n"]
    del net
    gc.collect()
    print(f"lorakit eval: {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    return metrics, counts


def run_suite(columns, suite: str = "zh", *, limit: int = 0, cmmlu=None, batch_size: int = 8, shots: int = 0,
              dtype: str = "auto", progress: bool = True) -> dict:
    """Evaluate every `(name, model, adapter_or_None)` column on the suite; `limit` caps each task and CMMLU subject.

    Returns {"columns": [names], "metrics": {metric: {name: value}}, "counts": {metric: items measured}}."""
    if suite not in SUITES:
        raise LorakitError(f"unknown suite '{suite}'; one of {', '.join(SUITES)}")
    names = [c[0] for c in columns]
    if len(set(names)) != len(names):
        raise LorakitError(f"column names must be unique, got {names}")
    if cmmlu and not Path(cmmlu).is_dir():
        raise LorakitError(f"{cmmlu}: CMMLU directory not found")
    result = {"suite": suite, "columns": names, "metrics": {}, "counts": {}, "limit": limit, "cmmlu": str(cmmlu or ""),
              "cmmlu_subjects": CMMLU_SUBSET if cmmlu else [], "cmmlu_shots": shots,
              "models": {n: {"model": m, "adapter": a} for n, m, a in columns}}
    for name, model, adapter in columns:
        metrics, counts = _column(name, model, adapter, limit=limit, cmmlu=cmmlu, batch_size=batch_size, shots=shots,
                                  dtype=dtype, progress=progress)
        for k in SUITES[suite]:
            if k in metrics:
                result["metrics"].setdefault(k, {})[name] = metrics[k]
                result["counts"][k] = counts[k]
    return result


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def markdown_table(result: dict) -> str:
    """The suite as a markdown table: one row per metric (arrow = better direction), one column per model."""
    names = result["columns"]
    lines = ["| metric | " + " | ".join(names) + " | n |", "| --- |" + " ---: |" * (len(names) + 1)]
    for key, values in result["metrics"].items():
        label, higher = METRICS.get(key, (key, True))
        cells = " | ".join(_fmt(values.get(n)) for n in names)
        lines.append(f"| {label} {'↑' if higher else '↓'} | {cells} | {result['counts'].get(key, '')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """One bar chart per metric, a bar per column, written atomically."""
    matplotlib.use("Agg")
    keys, names = list(result["metrics"]), result["columns"]
    cols = min(3, len(keys)) or 1
    fig, axes = plt.subplots(-(-len(keys) // cols) or 1, cols, figsize=(4.2 * cols, 3.2 * (-(-len(keys) // cols) or 1)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        label, higher = METRICS.get(key, (key, True))
        ax.bar(range(len(names)), [result["metrics"][key].get(n, math.nan) for n in names], color="C0")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_outputs(result: dict, output_dir, force: bool = False) -> Path:
    """Write `suite.json`, `suite.md` and `suite.png` into `output_dir`; an existing result needs `force`."""
    out = Path(output_dir)
    if (out / "suite.json").exists() and not force:
        raise LorakitError(f"{out}/suite.json: already exists; pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "suite.png")
    write_text(out / "suite.md", markdown_table(result))
    write_json(out / "suite.json", result)
    return out
