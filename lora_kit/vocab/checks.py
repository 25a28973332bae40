"""Measurements behind `vocab_report.json` and `lorakit tokstats`: tokens and chars/token on held-out text, lines of
non-Chinese text whose ids changed, HF-vs-SentencePiece agreement, and what counts as Chinese.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

Encode = Callable[[list[str]], list[list[int]]]

HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_PUNCT = "\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u2010-\u2027\u00b7"
# A new piece holds Han plus CJK/fullwidth/general punctuation only: no Latin letters, digits or spaces, so text
# without a Han character can never contain it (requirement: no drift on non-Chinese text).
PIECE_OK = re.compile(rf"^(?=.*[\u3400-\u4dbf\u4e00-\u9fff])[\u3400-\u4dbf\u4e00-\u9fff{_PUNCT}]+$")
PURE_HAN = re.compile(r"^[\u3400-\u4dbf\u4e00-\u9fff]+$")

# Built-in non-Chinese probes for the drift check: prose, code with runs of spaces, digits, other scripts.
CHECK_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1998, the population was 1,234,567 (an increase of 3.14% since 1990).",
    "def main(argv):\n    if not argv:\n        return 0\n\n    for i in range(10):  # loop\n\t\tprint(i)",
    "    indented   with   runs  of     spaces    ",
    "https://example.com/path?q=lorakit&lang=zh-CN#section-2",
    "Привет, мир! Καλημέρα κόσμε. こんにちは、せかい。 안녕하세요 세계",
    "emoji 🙂🚀 and symbols © ® ™ → ← ∑ ∞ «quoted» “curly” ‘single’ — dash … ellipsis",
    "０１２３ ＡＢＣ fullwidth letters and digits, ，。、！？ punctuation alone",
    "Numbers: 0 1 22 333 4444 55555 666666 7777777 88888888 999999999 3.14159265358979",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name DESC LIMIT 10;",
]


def has_han(text: str) -> bool:
    """True if `text` contains a Han character."""
    return HAN.search(text) is not None


def split_lines(texts: Iterable[str]) -> list[str]:
    """Non-empty lines of each text (multi-line records become several probes)."""
    return [l for t in texts for l in t.split("\n") if l.strip()]


def count(encode: Encode, lines: list[str]) -> int:
    """Total tokens `encode` gives for `lines`."""
    return sum(len(ids) for ids in encode(lines))


def efficiency(base: Encode, new: Encode, lines: list[str]) -> dict:
    """Tokens and chars/token before and after on `lines` (ratio = after / before)."""
    chars = sum(len(l) for l in lines)
    before, after = count(base, lines), count(new, lines)
    return {"lines": len(lines), "chars": chars, "tokens_before": before, "tokens_after": after,
            "chars_per_token_before": round(chars / max(before, 1), 4),
            "chars_per_token_after": round(chars / max(after, 1), 4), "ratio": round(after / max(before, 1), 4)}


def differing(a: Encode, b: Encode, lines: list[str]) -> list[int]:
    """Indices of lines that `a` and `b` encode to different ids."""
    return [i for i, (x, y) in enumerate(zip(a(lines), b(lines))) if x != y]


def drift(base: Encode, new: Encode, lines: list[str]) -> dict:
    """How many of the lines without Han characters tokenize differently after the extension (should be 0)."""
    probes = [l for l in lines if not has_han(l)]
    bad = differing(base, new, probes)
    return {"lines": len(probes), "changed": len(bad), "examples": [probes[i][:120] for i in bad[:3]]}


def agreement(hf: Encode, sp: Encode, lines: list[str]) -> dict:
    """How many lines the transformers tokenizer and sentencepiece encode to the same ids."""
    bad = differing(hf, sp, lines)
    return {"lines": len(lines), "identical": len(lines) - len(bad),
            "rate": round(1 - len(bad) / max(len(lines), 1), 6), "examples": [lines[i][:120] for i in bad[:3]]}
