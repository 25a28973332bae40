"""Multiple-choice benchmarks in their published layouts (CMMLU, C-Eval, MMLU): reading the CSVs, building 0/k-shot
prompts in each benchmark's own wording, and scoring by the log-probability of the option letters after the prompt.

Prompts and scoring follow lm-evaluation-harness's task configs (the oracle in benchmarks/eval_vs_lm_eval.py): the
description, k dev examples `question, A. .. D., 答案： X` separated by blank lines, then the question; the answer is
the option whose continuation (" A" .. " D") is most likely. Accuracy per subject, category and overall.
"""
from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from lora_kit.errors import LorakitError
from lora_kit.templates import prompt_ids

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's layout and wording."""
    name: str
    scored: str  # split whose answers are scored
    shots: str  # split the k-shot examples come from
    header: Optional[tuple[str, ...]]  # required columns (question, A-D, answer); None = header-less CSV
    suffixed: bool  # files are `{subject}_{split}.csv` (else `{split}/{subject}.csv` names the subject alone)
    description: str  # {subject} is the subject's display name
    answer_cue: str  # what precedes the letter

    def display(self, subject: str, names: dict[str, str]) -> str:
        return names.get(subject) or subject.replace("_", " ")


BENCHMARKS = {
    # lm-eval tasks/cmmlu/_default_template_yaml and its per-subject descriptions
    "cmmlu": Benchmark("cmmlu", "test", "dev", ("Question", "A", "B", "C", "D", "Answer"), False,
                       "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "答案："),
    # lm-eval tasks/ceval/_default_ceval_yaml: test answers are hidden, so val is the scored split
    "ceval": Benchmark("ceval", "val", "dev", ("question", "A", "B", "C", "D", "answer"), True,
                       "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "答案："),
    # lm-eval tasks/mmlu/default/_default_template_yaml (hendrycks layout: data/{dev,val,test}/{subject}_{split}.csv)
    "mmlu": Benchmark("mmlu", "test", "dev", None, True,
                      "The following are multiple choice questions (with answers) about {subject}.\n\n", "Answer:"),
}


@dataclass
class Question:
    """One multiple-choice question as read from a CSV."""
    subject: str
    row: int  # line of the CSV where the record ends (header = 1)
    question: str
    options: tuple[str, str, str, str]
    answer: int  # index into LETTERS


@dataclass
class Subject:
    """A benchmark subject: its scored questions and the dev questions its shots come from."""
    name: str
    display: str
    categories: list[str]
    scored: list[Question]
    dev: list[Question] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- reading
def read_csv(path: Path, bench: Benchmark, subject: str) -> list[Question]:
    """The questions of one CSV; a malformed file raises one line naming file, row and field."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LorakitError(f"{path}: cannot read ({e})") from None
    fields = ("question", "A", "B", "C", "D", "answer")
    if bench.header is not None:
        if not rows:
            raise LorakitError(f"{path}: row 1: empty file, expected the header {','.join(bench.header)}")
        header = [h.strip() for h in rows[0][1]]
        missing = [h for h in bench.header if h not in header]
        if missing:
            raise LorakitError(f"{path}: row 1: missing field '{missing[0]}' in the header")
        cols = [header.index(h) for h in bench.header]
        rows = rows[1:]
    else:
        cols = list(range(6))
    out = []
    for line, r in rows:
        if not any(c.strip() for c in r):
            continue
        if len(r) <= max(cols):
            name = (bench.header or fields)[next(i for i, c in enumerate(cols) if c >= len(r))]
            raise LorakitError(f"{path}: row {line}: missing field '{name}'")
        values = [r[c] for c in cols]
        answer = values[5].strip().upper()
        if answer not in LETTERS:
            raise LorakitError(f"{path}: row {line}: field '{(bench.header or fields)[5]}' is {values[5]!r}, "
                               "expected one of A, B, C, D")
        out.append(Question(subject, line, values[0], tuple(values[1:5]), LETTERS.index(answer)))
    return out


def _split_files(root: Path, bench: Benchmark, split: str) -> dict[str, Path]:
    folder = root / split
    if bench.suffixed:
        return {p.name[: -len(f"_{split}.csv")]: p for p in sorted(folder.glob(f"*_{split}.csv"))}
    return {p.stem: p for p in sorted(folder.glob("*.csv"))}


def _metadata(root: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(display names, categories) per subject from the benchmark's own files, when present: CMMLU's
    categories.json (subject -> subcategories -> categories), C-Eval's subject_mapping.json ([en, zh, category])."""
    names: dict[str, str] = {}
    cats: dict[str, list[str]] = {}
    cmmlu = root / "categories.json"
    if cmmlu.is_file():
        doc = json.loads(cmmlu.read_text(encoding="utf-8"))
        names.update(doc.get("name_en2zh", {}))
        of_sub = {s: c for c, subs in doc.get("categories", {}).items() for s in subs}
        for subject, subs in doc.get("subcategories", {}).items():
            cats[subject] = sorted({of_sub[s] for s in subs if s in of_sub})
    ceval = root / "subject_mapping.json"
    if ceval.is_file():
        for subject, (_en, zh, category) in json.loads(ceval.read_text(encoding="utf-8")).items():
            names[subject], cats[subject] = zh, [category]
    return names, cats


def load_benchmark(task: str, root, subjects: Optional[list[str]] = None, limit: int = 0) -> list[Subject]:
    """The subjects of a benchmark directory (all, or `subjects`), each with its scored questions (the first `limit`
    when given) and its dev split for shots."""
    if task not in BENCHMARKS:
        raise LorakitError(f"unknown benchmark '{task}'; one of {', '.join(BENCHMARKS)}")
    bench, root = BENCHMARKS[task], Path(root)
    if not root.is_dir():
        raise LorakitError(f"{root}: benchmark directory not found (expected {bench.scored}/ and {bench.shots}/)")
    scored, dev = _split_files(root, bench, bench.scored), _split_files(root, bench, bench.shots)
    if not scored:
        raise LorakitError(f"{root / bench.scored}: empty split (no {task} CSV files)")
    names, cats = _metadata(root)
    wanted = subjects or sorted(scored)
    unknown = [s for s in wanted if s not in scored]
    if unknown:
        have = ", ".join(sorted(scored)[:3])
        raise LorakitError(f"{root / bench.scored}: no subject '{unknown[0]}' (have e.g. {have})")
    out = []
    for name in wanted:
        questions = read_csv(scored[name], bench, name)
        if not questions:
            raise LorakitError(f"{scored[name]}: empty split (no questions)")
        shots = read_csv(dev[name], bench, name) if name in dev else []
        out.append(Subject(name, bench.display(name, names), cats.get(name, []),
                           questions[:limit] if limit else questions, shots))
    return out


# ---------------------------------------------------------------------------------------------------- prompts
def format_question(q: Question, bench: Benchmark) -> str:
    """The question, its four options and the answer cue, in the benchmark's layout."""
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.options))
    return f"{q.question.strip()}{options}\n{bench.answer_cue}"


def build_prompt(subject: Subject, q: Question, bench: Benchmark, shots: int) -> str:
    """Description, then `shots` dev examples of the same subject with their answers, then the question."""
    if shots > len(subject.dev):
        raise LorakitError(f"{subject.name}: {shots}-shot needs {shots} {bench.shots} examples, the split has "
                           f"{len(subject.dev)}")
    examples = "".join(f"{format_question(d, bench)} {LETTERS[d.answer]}\n\n" for d in subject.dev[:shots])
    return bench.description.format(subject=subject.display) + examples + format_question(q, bench)


# ---------------------------------------------------------------------------------------------------- scoring
def _requests(tokenizer, context: str, template, max_len: int) -> list[tuple[list[int], dict[int, list[tuple]]]]:
    """Token rows for one question: (ids, {option: [(position, token)]}). The continuation of each option is what
    the tokenizer adds to the context for " X" (lm-eval's split); single-token options share one row."""
    if template is not False:  # chat: the prompt is one user turn, the letter starts the assistant's reply
        ctx = prompt_ids(tokenizer, template, [{"role": "user", "content": context}])
        conts = [tokenizer(letter, add_special_tokens=False)["input_ids"] for letter in LETTERS]
    else:
        ctx = tokenizer(context)["input_ids"]
        conts = [tokenizer(context + " " + letter)["input_ids"][len(ctx):] for letter in LETTERS]
    longest = max(len(c) for c in conts)
    ctx = ctx[-(max_len - longest):]  # left truncation, as lm-eval does past the model's length
    if all(len(c) == 1 for c in conts):
        return [(ctx, {i: [(len(ctx) - 1, c[0])] for i, c in enumerate(conts)})]
    return [(ctx + c[:-1], {i: [(len(ctx) - 1 + j, t) for j, t in enumerate(c)]}) for i, c in enumerate(conts)]


MIN_SHARED = 32  # tokens: a shorter common prefix is recomputed rather than cached


def _forward_rows(model, rows: list[list[int]], pad: int, positions: list[list[int]],
                  prefix=None) -> list[torch.Tensor]:
    """Log-softmax (fp32) at the given positions of each row; right padding, LM head applied only where read.
    `prefix` = (length, cache): every row starts with those tokens, whose keys/values are already computed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dev = next(model.parameters()).device
    skip, cache = prefix if prefix else (0, None)
    width = max(len(r) for r in rows) - skip
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), skip + width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r) - skip] = torch.tensor(r[skip:])
        mask[i, :len(r)] = 1
    if cache is not None:
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(len(rows))
    hidden = base.get_decoder()(input_ids=ids.to(dev), attention_mask=mask.to(dev), past_key_values=cache,
                                use_cache=cache is not None).last_hidden_state
    picked = hidden[torch.tensor([i for i, p in enumerate(positions) for _ in p]),
                    torch.tensor(sum(positions, [])) - skip]
    logp = torch.log_softmax(base.get_output_embeddings()(picked).float(), dim=-1)
    out, at = [], 0
    for p in positions:
        out.append(logp[at:at + len(p)])
        at += len(p)
    return out


def _shared_prefix(rows: list[tuple]) -> int:
    """Tokens every row of a group starts with, short of the first position any row reads."""
    first = rows[0][1]
    n = min(min(p for lst in reads.values() for p, _ in lst) for _, _, reads in rows)
    for _, ids, _ in rows[1:]:
        n = min(n, len(ids))
        n = next((i for i in range(n) if ids[i] != first[i]), n)
    return n


@torch.inference_mode()
def _prefix_cache(model, ids: list[int]):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dev = next(model.parameters()).device
    return base.get_decoder()(input_ids=torch.tensor([ids], device=dev), use_cache=True).past_key_values


@torch.inference_mode()
def score_questions(model, tokenizer, prompts: list[str], *, groups: Optional[list] = None, template=False,
                    batch_size: int = 8, progress: bool = True, desc: str = "questions") -> list[list[float]]:
    """Log-likelihood of each option (A-D) for every prompt, batched over similar lengths (deterministic).

    Prompts with the same `groups` key (a subject: same description and shots) compute their common token prefix
    once and reuse its keys/values, so k shots cost about as much as zero."""
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    per_q = [_requests(tokenizer, p, template, max_len) for p in prompts]
    keys = groups if groups is not None else list(range(len(prompts)))
    by_group: dict = {}
    for qi, reqs in enumerate(per_q):
        by_group.setdefault(keys[qi], []).extend((qi, ids, reads) for ids, reads in reqs)
    scores = [[0.0] * len(LETTERS) for _ in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, unit="q", disable=not progress)
    try:
        for rows in by_group.values():
            shared = _shared_prefix(rows) if len(rows) > 1 else 0
            prefix = (shared, _prefix_cache(model, rows[0][1][:shared])) if shared >= MIN_SHARED else None
            rows = sorted(rows, key=lambda r: -len(r[1]))  # stable: ties keep question order
            for b in range(0, len(rows), batch_size):
                batch = rows[b:b + batch_size]
                positions = [sorted({p for lst in reads.values() for p, _ in lst}) for _, _, reads in batch]
                logps = _forward_rows(model, [ids for _, ids, _ in batch], pad, positions, prefix)
                for (qi, _, reads), lp, pos in zip(batch, logps, positions):
                    where = {p: k for k, p in enumerate(pos)}
                    for option, lst in reads.items():
                        scores[qi][option] += sum(float(lp[where[p], t]) for p, t in lst)
                bar.update(sum(1 for _, _, reads in batch if 0 in reads))  # a question counts once (its A row)
    finally:
        bar.close()
        model.train(was_training)
    return scores


def _accuracy(hits: list[bool]) -> dict:
    return {"n": len(hits), "accuracy": sum(hits) / len(hits) if hits else math.nan}


def evaluate_benchmark(model, tokenizer, task: str, root, *, shots: int = 0, subjects: Optional[list[str]] = None,
                       limit: int = 0, template=False, batch_size: int = 8, progress: bool = True) -> dict:
    """Accuracy per subject, per category and overall (micro: every question weighs the same), with counts and each
    question's option log-likelihoods."""
    bench = BENCHMARKS[task]
    subs = load_benchmark(task, root, subjects, limit)
    items = [(s, q) for s in subs for q in s.scored]
    prompts = [build_prompt(s, q, bench, shots) for s, q in items]
    scores = score_questions(model, tokenizer, prompts, groups=[s.name for s, _ in items], template=template,
                             batch_size=batch_size, progress=progress, desc=f"{task} {shots}-shot")
    questions, by_subject, by_category = [], {}, {}
    for (s, q), sc in zip(items, scores):
        pred = max(range(len(LETTERS)), key=lambda i: (sc[i], -i))  # first of equal maxima, as numpy argmax
        hit = pred == q.answer
        questions.append({"subject": s.name, "row": q.row, "answer": LETTERS[q.answer], "predicted": LETTERS[pred],
                          "loglik": [round(x, 6) for x in sc]})
        by_subject.setdefault(s.name, []).append(hit)
        for c in s.categories:
            by_category.setdefault(c, []).append(hit)
    all_hits = [h for hits in by_subject.values() for h in hits]
    return {"task": task, "data": str(root), "shots": shots, "chat_template": template is not False,
            **_accuracy(all_hits),
            "subjects": {s.name: {**_accuracy(by_subject[s.name]), "categories": s.categories} for s in subs},
            "categories": {c: _accuracy(h) for c, h in sorted(by_category.items())},
            "questions": questions}
