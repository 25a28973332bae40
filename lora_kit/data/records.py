"""Datasets: read files / bundled names / hub ids, detect the record format, validate with file:line errors, tokenize
with assistant-only labels, and pack records into rows without padding or cross-record attention.

Formats are a registry (`register_format`); each turns one record into a conversation (list of role/content messages).
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Callable, Iterator, Optional

import datasets
import pyarrow.parquet as pq
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from lora_kit.errors import LorakitError, where
from lora_kit.templates import encode

BUNDLED_DIR = Path(__file__).resolve().parents[2] / "data"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "bot": "assistant", "model": "assistant"}


@dataclass
class Record:
    """One raw record and where it came from (file and 1-based index), for error messages."""
    source: str  # file name (or hub id)
    index: int  # 1-based line (jsonl, csv) or record number (json array, parquet)
    data: dict
    unit: str = "line"  # what `index` counts: "line" or "record"

    def loc(self, field: Optional[str] = None) -> str:
        return where(self.source, self.index if self.unit == "line" else f" record {self.index}", field)


# ---------------------------------------------------------------------------------------------------- reading
def bundled_path(name: str) -> Optional[Path]:
    """A dataset shipped in data/ (source tree or installed package), by file stem."""
    dirs = [BUNDLED_DIR]
    try:
        dirs.append(Path(str(files("lora_kit.bundled"))))
    except (ModuleNotFoundError, TypeError):
        pass
    for d in dirs:
        for ext in (".jsonl", ".json"):
            if (d / f"{name}{ext}").is_file():
                return d / f"{name}{ext}"
    return None


def _read_jsonl(path: Path, problems: Optional[list] = None) -> Iterator[Record]:
    """Records of a JSON-lines file; a bad line raises, or is appended to `problems` and skipped when given."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark (Windows tools) is fine
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LorakitError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno})") from None
            except UnicodeDecodeError as e:
                err = LorakitError(f"{path}:{n}: invalid UTF-8 at byte {e.start}")
            except LorakitError as e:
                err = e
            else:
                yield Record(str(path), n, obj)
                continue
            if problems is None:
                raise err
            problems.append(str(err))


def _read_json(path: Path, problems: Optional[list] = None) -> Iterator[Record]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LorakitError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if "Extra data" in e.msg:  # a .json file holding JSON lines
            yield from _read_jsonl(path, problems)
            return
        raise LorakitError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise LorakitError(f"{path}: expected a list of records (or an object holding one list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise LorakitError(f"{path}: expected a list of records")
    for n, rec in enumerate(obj, 1):
        yield Record(str(path), n, rec, "record")


def _read_table(path: Path, problems: Optional[list] = None) -> Iterator[Record]:
    if path.suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):  # line 1 is the header
                yield Record(str(path), n, dict(row))
        return

    for n, row in enumerate(pq.read_table(path).to_pylist(), 1):
        yield Record(str(path), n, row, "record")


def read_records(spec: str, problems: Optional[list] = None) -> list[Record]:
    """Records from a file (json, jsonl, parquet, csv), a bundled dataset name, or a hub dataset id. With a
    `problems` list, unreadable lines are reported there and skipped instead of raising."""
    if not spec:
        raise LorakitError("no data given (data=FILE|BUNDLED_NAME|HUB_ID)")
    path = Path(spec).expanduser()
    if not path.exists() and bundled_path(spec):
        path = bundled_path(spec)
    if path.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_table, ".parquet": _read_table}
        if path.suffix not in readers:
            raise LorakitError(f"{path}: unsupported file type (json, jsonl, parquet, csv)")
        records = list(readers[path.suffix](path, problems))
    elif path.is_dir():
        raise LorakitError(f"{spec}: is a directory; give a data file (json, jsonl, parquet, csv)")
    elif path.exists():
        raise LorakitError(f"{spec}: not a regular file (a FIFO or device?); give a data file (json, jsonl, parquet, "
                           "csv)")
    elif spec.startswith((".", "/", "~")) or spec.endswith((".json", ".jsonl", ".csv", ".parquet")):
        raise LorakitError(f"{spec}: data file not found")
    else:
        records = _read_hub(spec)
    if not records and not problems:
        raise LorakitError(f"{spec}: no records")
    return records


def _read_hub(spec: str) -> list[Record]:
    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # the hub library raises many types; the user needs one line
        raise LorakitError(f"{spec}: not a file, bundled dataset or loadable hub dataset "
                           f"({str(e).splitlines()[0]})") from None
    return [Record(spec, n, dict(r)) for n, r in enumerate(ds, 1)]


# ---------------------------------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class Format:
    """A registered SFT data format: how to recognise a record and turn it into chat messages."""
    name: str
    detect: Callable[[dict], bool]
    to_messages: Callable[[Record], list[dict]]


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add `fmt` to FORMATS (auto-detection tries formats in registration order); a name twice is a bug."""
    if fmt.name in FORMATS:
        raise ValueError(f"format '{fmt.name}' registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def text_field(rec: Record, key: str, required: bool = True, allow_empty: bool = False) -> str:
    """The string field `key` of a record ('' when absent and not required); else an error naming record and field."""
    value = rec.data.get(key)
    if value is None:
        if required:
            raise LorakitError(f"{rec.loc(key)} is {'null' if key in rec.data else 'missing'}")
        return ""
    if not isinstance(value, str):
        raise LorakitError(f"{rec.loc(key)} must be a string, got {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise LorakitError(f"{rec.loc(key)} is empty")
    return value


def alpaca_messages(rec: Record) -> list[dict]:
    """An alpaca record (system, history, instruction + input) as messages up to its user turn."""
    msgs = []
    system = text_field(rec, "system", required=False)
    if system:
        msgs.append({"role": "system", "content": system})
    history = rec.data.get("history") or []
    if not isinstance(history, list):
        raise LorakitError(f"{rec.loc('history')} must be a list of [instruction, response] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise LorakitError(f"{rec.loc(f'history[{i}]')} must be a pair of strings")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = text_field(rec, "instruction", allow_empty=True)
    extra = text_field(rec, "input", required=False)
    prompt = f"{instruction}\n{extra}" if instruction and extra else (instruction or extra)
    if not prompt.strip():
        raise LorakitError(f"{rec.loc('instruction')} and 'input' are both empty")
    msgs.append({"role": "user", "content": prompt})
    msgs.append({"role": "assistant", "content": text_field(rec, "output")})
    return msgs


def turn_messages(rec: Record, key: str, role_key: str, content_key: str) -> list[dict]:
    """The list of turns in field `key` as {role, content} messages (sharegpt's from/value or messages' own keys)."""
    turns = rec.data.get(key)
    if not isinstance(turns, list):
        raise LorakitError(f"{rec.loc(key)} must be a list of turns")
    if not turns:
        raise LorakitError(f"{rec.loc(key)} is an empty conversation")
    msgs = []
    for i, t in enumerate(turns):
        f = f"{key}[{i}]"
        if not isinstance(t, dict):
            raise LorakitError(f"{rec.loc(f)} must be an object with '{role_key}' and '{content_key}'")
        role = t.get(role_key)
        if not isinstance(role, str) or role not in ROLES:
            raise LorakitError(f"{rec.loc(f + '.' + role_key)} has unknown role {role!r} "
                               f"(expected one of {', '.join(sorted(ROLES))})")
        content = t.get(content_key)
        if not isinstance(content, str):
            raise LorakitError(f"{rec.loc(f + '.' + content_key)} must be a string")
        msgs.append({"role": ROLES[role], "content": content})
    system = rec.data.get("system")
    if isinstance(system, str) and system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def check_conversation(rec: Record, msgs: list[dict], key: str, need_answer: bool = True) -> list[dict]:
    """Roles alternate user/assistant after an optional system message; ends with an answer (for SFT)."""
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise LorakitError(f"{rec.loc(key)}: turn {i + 1} is '{m['role']}', expected '{expected}' "
                               "(turns must alternate user/assistant)")
    if need_answer and (not body or body[-1]["role"] != "assistant"):
        raise LorakitError(f"{rec.loc(key)}: the conversation must end with an assistant turn")
    if need_answer and not any(m["content"].strip() for m in body if m["role"] == "assistant"):
        raise LorakitError(f"{rec.loc(key)}: every assistant turn is empty")
    return msgs


register_format(Format("alpaca", lambda d: "instruction" in d and "output" in d, alpaca_messages))
register_format(Format("sharegpt", lambda d: "conversations" in d and "chosen" not in d,
                       lambda r: check_conversation(r, turn_messages(r, "conversations", "from", "value"),
                                                    "conversations")))
register_format(Format("messages", lambda d: "messages" in d,
                       lambda r: check_conversation(r, turn_messages(r, "messages", "role", "content"), "messages")))


def unambiguous(rec: Record) -> list[Format]:
    """The formats whose fields a record has, refusing a record that has the fields of two (which one was meant?)."""
    matches = [fmt for fmt in FORMATS.values() if isinstance(rec.data, dict) and fmt.detect(rec.data)]
    if len(matches) > 1:
        names = " and ".join(f.name for f in matches)
        raise LorakitError(f"{rec.loc()}: ambiguous record: it has the fields of {names}; keep one format's fields, "
                           "or set data_format")
    return matches


def detect_format(rec: Record, wanted: str = "auto") -> Format:
    """The format `wanted` names, or with `auto` the first registered format that recognises `rec`."""
    if not isinstance(rec.data, dict):
        raise LorakitError(f"{rec.loc()}: a record must be a JSON object, got {type(rec.data).__name__}")
    if wanted != "auto":
        if wanted not in FORMATS:
            raise LorakitError(f"unknown data_format '{wanted}' (known: auto, {', '.join(FORMATS)})")
        return FORMATS[wanted]
    matches = unambiguous(rec)
    if matches:
        return matches[0]
    raise LorakitError(f"{rec.loc()}: unrecognised record (fields {sorted(rec.data)[:6]}); expected alpaca "
                       f"(instruction/output), sharegpt (conversations) or messages")


def conversations(records: list[Record], data_format: str = "auto", skip_bad: bool = False):
    """(list of (record, messages), number skipped). Stops at the first bad record unless `skip_bad`."""
    out, skipped, first_error = [], 0, None
    fmt = None
    for rec in records:
        try:
            fmt = fmt or detect_format(rec, data_format)
            if data_format == "auto":
                unambiguous(rec)
            if not isinstance(rec.data, dict):
                raise LorakitError(f"{rec.loc()}: a record must be a JSON object")
            out.append((rec, fmt.to_messages(rec)))
        except LorakitError as e:
            if not skip_bad:
                raise
            skipped += 1
            first_error = first_error or str(e)
    if skipped:
        print(f"lorakit: skipped {skipped} bad records (first: {first_error})", flush=True)
    if not out:
        raise LorakitError(f"{records[0].source}: no usable records")
    return out, skipped


# ---------------------------------------------------------------------------------------------------- tokenizing
@dataclass
class TokenStats:
    """Counts of one tokenization pass (records kept, truncated, dropped, tokens, trained tokens) for logs."""
    records: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped: int = 0
    tokens: int = 0
    label_tokens: int = 0
    prompt_tokens: int = 0  # prompt tokens trained at prompt_weight (SFT's prompt_loss_weight > 0)
    prompt_weight: float = 0.0
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        trained = (f"{self.label_tokens} answer tokens at weight 1, {self.prompt_tokens} prompt tokens at "
                   f"{self.prompt_weight:g}" if self.prompt_weight > 0 else f"{self.label_tokens} trained")
        return (f"{self.records} records, {self.tokens} tokens ({trained}), "
                f"{self.truncated} truncated, {self.dropped} dropped, {self.skipped} skipped")


def fit_to_cutoff(seqs: list[list], cutoff_len: int, overlong: str, keep: str = "start") -> Optional[list[list]]:
    """The rule every stage applies to a record's token sequences (ids, labels, a pair's two answers, a prompt): all
    returned as they are when none is over `cutoff_len`; else None with overlong="drop", or each cut to `cutoff_len`
    tokens, keeping its first tokens (`keep="start"`) or, for a prompt to answer, its last (`keep="end"`)."""
    if all(len(s) <= cutoff_len for s in seqs):
        return seqs
    if overlong == "drop":
        return None
    return [s[:cutoff_len] if keep == "start" else s[-cutoff_len:] for s in seqs]


def tokenize_conversations(convs, tokenizer, template, cutoff_len: int, overlong: str = "truncate",
                           prompt_loss_weight: float = 0.0):
    """Examples {input_ids, labels} with -100 outside assistant turns; over-long records truncated or dropped.

    With `prompt_loss_weight` > 0 the prompt's tokens are trained too, each at that weight against 1 for an answer
    token: examples then carry `loss_weights` (one per token, the weight of predicting it) and labels everywhere but
    the record's first token, which nothing in the record predicts (packed, the previous record's last token would)."""
    examples, stats = [], TokenStats()
    for rec, msgs in convs:
        ids, labels = encode(tokenizer, template, msgs, max_tokens=cutoff_len)
        cut = len(ids) > cutoff_len
        fitted = fit_to_cutoff([ids, labels], cutoff_len, overlong)
        if fitted is None:
            stats.dropped += 1
            continue
        ids, labels = fitted
        if all(l == -100 for l in labels[1:]):
            stats.dropped += 1  # nothing left to learn from (the answer was cut off entirely)
            continue
        stats.truncated += cut
        stats.records += 1
        stats.tokens += len(ids)
        stats.label_tokens += sum(l != -100 for l in labels[1:])
        if prompt_loss_weight > 0:
            weights = [0.0] + [1.0 if l != -100 else prompt_loss_weight for l in labels[1:]]
            stats.prompt_tokens += sum(l == -100 for l in labels[1:])
            stats.prompt_weight = prompt_loss_weight
            examples.append({"input_ids": ids, "labels": [-100] + ids[1:], "loss_weights": weights})
        else:
            examples.append({"input_ids": ids, "labels": labels})
    return examples, stats


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded random `fraction` held out (at least one item), order kept in both."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(items) * fraction))
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# ---------------------------------------------------------------------------------------------------- packing
def pack(examples: list[dict], capacity: int, seed: int = 0) -> list[dict]:
    """First-fit-decreasing bins of at most `capacity` tokens; each row holds whole records with restarting
    position ids, so attention never crosses a record boundary and almost nothing is padding."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        for b, free in enumerate(space):
            if free >= n:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(capacity - n)
    random.Random(seed).shuffle(bins)  # FFD sorts by length; shuffle so steps see a mix
    rows = []
    for b in bins:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        if "loss_weights" in examples[b[0]]:
            row["loss_weights"] = []
        for i in b:
            ex = examples[i]
            row["input_ids"] += ex["input_ids"]
            row["labels"] += ex["labels"]
            row["position_ids"] += list(range(len(ex["input_ids"])))
            if "loss_weights" in row:
                row["loss_weights"] += ex["loss_weights"]
        rows.append(row)
    return rows


def batch_padding(lengths: list[int], batch_size: int, grad_accum: int = 1, seed: int = 0) -> float:
    """Fraction of the tokens a model processes that are padding, when rows are batched the way `lorakit sft` batches
    them: the trainer's length-grouped sampler (shuffled, then sorted within mega-batches of ~50 batches) and a
    collator that pads each batch to its longest row. An estimate from one seeded draw of the same grouping."""
    if not lengths:
        return 0.0
    order = get_length_grouped_indices(lengths, batch_size * grad_accum, generator=torch.Generator().manual_seed(seed))
    processed = padding = 0
    for i in range(0, len(order), batch_size):
        group = [lengths[j] for j in order[i: i + batch_size]]
        processed += max(group) * len(group)
        padding += max(group) * len(group) - sum(group)
    return padding / processed


@dataclass
class Collator:
    """Pads a batch to its longest row. Packed rows (with position_ids) get no attention_mask and use_cache=False: the
    model then derives a block-diagonal causal mask from the restarting positions; pad tokens form their own segment.
    Rows with `loss_weights` (prompt_loss_weight) keep them, padded with 0."""

    pad_id: int

    def __call__(self, batch: list[dict]):
        width = max(len(b["input_ids"]) for b in batch)
        packed = "position_ids" in batch[0]
        out = {"input_ids": [], "labels": []}
        if packed:
            out["position_ids"] = []
        else:
            out["attention_mask"] = []
        weighted = "loss_weights" in batch[0]
        if weighted:
            out["loss_weights"] = []
        for b in batch:
            n = len(b["input_ids"])
            pad = width - n
            out["input_ids"].append(b["input_ids"] + [self.pad_id] * pad)
            out["labels"].append(b["labels"] + [-100] * pad)
            if weighted:
                out["loss_weights"].append(b["loss_weights"] + [0.0] * pad)
            if packed:
                out["position_ids"].append(b["position_ids"] + list(range(pad)))
            else:
                out["attention_mask"].append([1] * n + [0] * pad)
        batch = {k: torch.tensor(v, dtype=torch.float32 if k == "loss_weights" else torch.long)
                 for k, v in out.items()}
        if packed:
            # With a cache, transformers skips packed-sequence detection and records attend to each other.
            batch["use_cache"] = False
        return batch
