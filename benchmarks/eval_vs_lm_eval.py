"""lorakit's multiple-choice scoring against EleutherAI's lm-evaluation-harness on the same CMMLU subjects, model and
shots: per-question agreement, each side's accuracy, max |log-likelihood difference|, time and questions/second.

    python benchmarks/eval_vs_lm_eval.py --model smollm2-135m --data ../shared/data/cmmlu --subjects agronomy,arts
    python benchmarks/eval_vs_lm_eval.py --model smollm2-135m --adapter OUT --lm-eval-model MERGED ...

lm-eval reads the local CSVs through task configs written here (its cmmlu template: same wording, `first_n` shots);
for an adapter on an extended vocabulary lorakit scores base + adapter unmerged, lm-eval the `lorakit merge` output
(`--lm-eval-model`). Needs `pip install lorakit[eval]` (lm-eval).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lora_kit.evaluate.choice import BENCHMARKS, LETTERS, build_prompt, evaluate_benchmark, load_benchmark
from lora_kit.models.builder import load_for_inference
from lora_kit.models.load import resolve_model


def lorakit_side(args, subjects: list[str]) -> tuple[dict, float]:
    """lorakit's result and the seconds evaluate_benchmark took (reading, prompts, tokenizing and scoring)."""
    model, tok, _ = load_for_inference(args.model, args.adapter, dtype=args.dtype)
    t0 = time.perf_counter()  # model loading is outside both timings
    res = evaluate_benchmark(model, tok, "cmmlu", args.data, shots=args.shots, subjects=subjects, limit=args.limit,
                             batch_size=args.batch_size)
    return res, time.perf_counter() - t0


def task_configs(folder: Path, data: Path, subjects: list[str], names: dict[str, str]) -> list[str]:
    """lm-eval task YAMLs over the local CMMLU CSVs, copying lm-eval's own cmmlu template."""
    bench = BENCHMARKS["cmmlu"]
    tasks = []
    for s in subjects:
        name = f"local_cmmlu_{s}"
        cfg = {"task": name, "dataset_path": "csv",
               "dataset_kwargs": {"data_files": {"test": str(data / "test" / f"{s}.csv"),
                                                 "dev": str(data / "dev" / f"{s}.csv")}},
               "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
               "output_type": "multiple_choice",
               "doc_to_text": "{{Question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案：",
               "doc_to_choice": list(LETTERS), "doc_to_target": "{{['A', 'B', 'C', 'D'].index(Answer)}}",
               "description": bench.description.format(subject=names.get(s, s)),
               "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        tasks.append(name)
    return tasks


def lm_eval_side(args, subjects: list[str], names: dict[str, str]) -> tuple[dict, float]:
    """({(subject, index): option log-likelihoods}, {(subject, index): prompt}, seconds in lm-eval's scoring)."""
    from lm_eval import simple_evaluate  # optional dependency (lorakit[eval]): only this benchmark needs it
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=args.lm_eval_model or resolve_model(args.model), device="cpu", batch_size=args.batch_size,
              dtype="float32" if args.dtype == "fp32" else "bfloat16")
    scoring = [0.0]  # time inside lm-eval's model calls: its task indexing and dataset building are left out
    loglikelihood = lm.loglikelihood

    def timed(requests, **kw):
        t = time.perf_counter()
        try:
            return loglikelihood(requests, **kw)
        finally:
            scoring[0] += time.perf_counter() - t

    lm.loglikelihood = timed
    with tempfile.TemporaryDirectory() as tmp:
        tasks = task_configs(Path(tmp), Path(args.data), subjects, names)
        out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.shots,
                              batch_size=args.batch_size, limit=args.limit or None, log_samples=True,
                              task_manager=TaskManager(include_path=tmp))
    scores, contexts = {}, {}
    for s, t in zip(subjects, tasks):
        for sample in out["samples"][t]:
            scores[(s, sample["doc_id"])] = [float(r[0]) for r in sample["filtered_resps"]]
            first = sample["arguments"][0] if isinstance(sample["arguments"], list) else \
                next(iter(sample["arguments"].values()))
            contexts[(s, sample["doc_id"])] = first[0] if isinstance(first, (list, tuple)) else first["arg_0"]
    return scores, contexts, scoring[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", help="lorakit scores base + this adapter without merging")
    p.add_argument("--lm-eval-model", help="what lm-eval loads (default --model; with --adapter: the merged model)")
    p.add_argument("--data", required=True, help="CMMLU directory (dev/, test/, categories.json)")
    p.add_argument("--subjects", required=True, help="comma-separated CMMLU subjects")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="first N questions per subject")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--output", help="write the figures as JSON here")
    args = p.parse_args()
    if args.adapter and not args.lm_eval_model:
        sys.exit("--adapter needs --lm-eval-model (the `lorakit merge` output lm-eval scores)")
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    names = {s.name: s.display for s in load_benchmark("cmmlu", args.data, subjects)}
    ours, our_s = lorakit_side(args, subjects)
    theirs, their_prompts, their_s = lm_eval_side(args, subjects, names)
    ours_prompts = {(s.name, i): build_prompt(s, q, BENCHMARKS["cmmlu"], args.shots)
                    for s in load_benchmark("cmmlu", args.data, subjects, args.limit) for i, q in enumerate(s.scored)}
    same_prompt = sum(their_prompts.get(k) == v for k, v in ours_prompts.items())
    index: dict[str, int] = {}
    same, max_diff, their_hits = 0, 0.0, 0
    for q in ours["questions"]:
        i = index[q["subject"]] = index.get(q["subject"], -1) + 1
        ref = theirs[(q["subject"], i)]
        pred = LETTERS[max(range(4), key=lambda k: (ref[k], -k))]
        same += pred == q["predicted"]
        their_hits += pred == q["answer"]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(ref, q["loglik"])))
    n = ours["n"]
    fig = {"model": args.model, "adapter": args.adapter, "lm_eval_model": args.lm_eval_model, "subjects": subjects,
           "shots": args.shots, "limit": args.limit, "dtype": args.dtype, "batch_size": args.batch_size,
           "questions": n, "same_prompt": same_prompt / n, "agreement": same / n, "lorakit_accuracy": ours["accuracy"],
           "lm_eval_accuracy": their_hits / n, "max_abs_loglik_diff": max_diff,
           "lorakit_seconds": round(our_s, 1), "lm_eval_seconds": round(their_s, 1),
           "lorakit_questions_per_s": round(n / our_s, 2), "lm_eval_questions_per_s": round(n / their_s, 2)}
    print(json.dumps(fig, indent=2, ensure_ascii=False))
    print(f"same answer on {same}/{n} questions ({100 * same / n:.2f}%); accuracy lorakit {ours['accuracy']:.4f}, "
          f"lm-eval {their_hits / n:.4f}; {n / our_s:.2f} vs {n / their_s:.2f} questions/s")
    if args.output:
        Path(args.output).write_text(json.dumps(fig, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
