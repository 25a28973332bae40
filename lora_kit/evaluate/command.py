"""`lorakit eval`: one model (+ adapter) on a benchmark (CMMLU, C-Eval, MMLU), a generation task or a text file, or
several side by side on a named suite (`--suite zh`). Argument parsing and printing only; the measures live beside it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lora_kit.data.corpora import iter_lines
from lora_kit.errors import LorakitError
from lora_kit.evaluate.bpc import score_documents
from lora_kit.evaluate.choice import BENCHMARKS, evaluate_benchmark
from lora_kit.evaluate.suite import SUITES, markdown_table, run_suite, write_outputs
from lora_kit.evaluate.tasks import score_task
from lora_kit.models.builder import load_for_inference
from lora_kit.models.load import adapter_base
from lora_kit.rundir import write_json
from lora_kit.templates import resolve


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `lorakit eval`: what to load, which benchmark, task, text or suite, and limits."""
    p.add_argument("--model", help="base model (alias, dir, hub id); default: the adapter's base")
    p.add_argument("--adapter", action="append", default=[],
                   help="LoRA adapter directory written by a lorakit stage (repeat with --suite for more columns)")
    p.add_argument("--task", default="sentiment",
                   help="cmmlu, ceval, mmlu (with --data DIR), a bundled task (sentiment, segment) or an "
                        "alpaca/sharegpt file")
    p.add_argument("--data", help="benchmark directory in its published layout (CMMLU: dev/ test/; C-Eval: dev/ val/;"
                                  " MMLU: dev/ test/)")
    p.add_argument("--shots", type=int, default=0, help="k-shot: the first k dev examples of the same subject")
    p.add_argument("--subjects", help="comma-separated benchmark subjects (default: all)")
    p.add_argument("--chat-template", action="store_true",
                   help="benchmarks: wrap each prompt in the model's chat template (for chat models)")
    p.add_argument("--suite", choices=sorted(SUITES), help="run a named suite over --model and every --adapter")
    p.add_argument("--cmmlu", help="with --suite: CMMLU directory for the suite's CMMLU subset")
    p.add_argument("--text", help="instead of a task: report bits per character on this text file")
    p.add_argument("--limit", type=int, default=0, help="only the first N records (per subject for benchmarks)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=0, help="generation tasks (default: per task)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--template", help="override the prompt template (default: the adapter's training template)")
    p.add_argument("--output", help="write the result as JSON to this file (--suite: a directory for JSON + PNG)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")


def suite_columns(model, adapters: list[str]) -> list[tuple]:
    """(name, model, adapter) columns: the base model, then the base + each adapter."""
    base = model or adapter_base(adapters[0])
    names = [Path(base).name or base] + [f"+{Path(a).name}" for a in adapters]
    for i, n in enumerate(names[1:], 1):
        if names.count(n) > 1:
            names[i] = f"+{adapters[i - 1]}"
    return [(names[0], base, None)] + [(n, model, a) for n, a in zip(names[1:], adapters)]


def _print_benchmark(result: dict) -> None:
    print(f"{result['task']} {result['shots']}-shot: accuracy {result['accuracy']:.4f} on {result['n']} questions")
    for name, r in result["categories"].items():
        print(f"  {name:<24} {r['accuracy']:.4f}  ({r['n']} questions)")
    if len(result["subjects"]) <= 12:
        for name, r in result["subjects"].items():
            print(f"  {name:<40} {r['accuracy']:.4f}  ({r['n']})")


def main(args) -> int:
    """`lorakit eval`: run the chosen evaluation, print it, and write it to --output when given."""
    if args.output and not args.force and Path(args.output).is_file():
        raise LorakitError(f"{args.output}: already exists; pass --force to replace it")
    if args.suite:
        if not args.model and not args.adapter:
            raise LorakitError("--suite needs --model and/or --adapter")
        if args.output and not args.force and (Path(args.output) / "suite.json").exists():
            raise LorakitError(f"{args.output}/suite.json: already exists; pass --force to replace it")
        result = run_suite(suite_columns(args.model, args.adapter), args.suite, limit=args.limit, cmmlu=args.cmmlu,
                           batch_size=args.batch_size, shots=args.shots, dtype=args.dtype)
        print(markdown_table(result), end="")
        if args.output:
            print(f"lorakit eval: wrote {write_outputs(result, args.output, force=args.force)}")
        return 0
    if len(args.adapter) > 1:
        raise LorakitError("several --adapter are compared with --suite; give one adapter otherwise")
    adapter = args.adapter[0] if args.adapter else None
    model, tokenizer, template_name = load_for_inference(args.model, adapter, dtype=args.dtype)
    template = resolve(args.template or template_name, tokenizer)
    if args.text:
        s = score_documents(model, tokenizer, list(iter_lines(args.text)), batch_size=args.batch_size)
        result = {"text": args.text, "bits_per_char": s.bits_per_char, "tokens_per_char": s.tokens / s.chars,
                  "chars": s.chars}
        print(f"bits per character on {args.text}: {s.bits_per_char:.4f} ({s.tokens / s.chars:.3f} tokens/char)")
    elif args.task in BENCHMARKS:
        if not args.data:
            raise LorakitError(f"--task {args.task} needs --data DIR (the benchmark in its published layout)")
        subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
        result = evaluate_benchmark(model, tokenizer, args.task, args.data, shots=args.shots, subjects=subjects,
                                    limit=args.limit, template=template if args.chat_template else False,
                                    batch_size=args.batch_size)
        _print_benchmark(result)
    else:
        result = score_task(model, tokenizer, template, args.task, limit=args.limit, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens)
        for ex in result["examples"][:3]:
            print(f"  answer {ex['answer']!r}  reference {ex['reference']!r}")
        measures = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        print(f"{args.task}: {measures} on {result['n']} held-out records"
              f" ({'adapter ' + adapter if adapter else 'base model'})")
    result.update(model=args.model, adapter=adapter)
    if args.output:
        write_json(Path(args.output), result)
    return 0
