"""Scores for generated answers: exact match, character F1, and word-segmentation precision/recall/F1 (the SIGHAN
bakeoff measure: a word counts as correct when its character span matches a reference word's span).
"""
from __future__ import annotations

import re
from collections import Counter

_TRAILING = re.compile(r"[\s。.!！,，]+$")


def normalise(text: str) -> str:
    """An answer without surrounding whitespace and trailing punctuation."""
    return _TRAILING.sub("", text.strip())


def exact_match(answers: list[str], references: list[str]) -> float:
    """Share of answers equal to their reference after `normalise`."""
    hits = [normalise(a) == normalise(r) for a, r in zip(answers, references)]
    return sum(hits) / len(hits) if hits else float("nan")


def char_f1(answer: str, reference: str) -> float:
    """F1 of the characters two answers share (bag of characters, whitespace ignored), SQuAD's F1 at character level."""
    a, r = Counter(normalise(answer).replace(" ", "")), Counter(normalise(reference).replace(" ", ""))
    common = sum((a & r).values())
    if not a or not r:
        return float(a == r)
    if not common:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def mean_char_f1(answers: list[str], references: list[str]) -> float:
    """Mean `char_f1` over answer/reference pairs."""
    scores = [char_f1(a, r) for a, r in zip(answers, references)]
    return sum(scores) / len(scores) if scores else float("nan")


def _spans(words: list[str]) -> set[tuple[int, int, str]]:
    out, at = set(), 0
    for w in words:
        out.add((at, at + len(w), w))
        at += len(w)
    return out


def segmentation_prf(predicted: list[str], gold: list[str]) -> dict:
    """Corpus-level word precision, recall and F1 of space-separated segmentations (micro over all sentences).

    A predicted word is correct when the same word occupies the same characters in the reference; a prediction
    that changes the sentence's characters therefore loses the words after the change."""
    correct = n_pred = n_gold = 0
    for p, g in zip(predicted, gold):
        pw, gw = p.split(), g.split()
        correct += len(_spans(pw) & _spans(gw))
        n_pred += len(pw)
        n_gold += len(gw)
    precision = correct / n_pred if n_pred else 0.0
    recall = correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "words_predicted": n_pred, "words_reference": n_gold,
            "words_correct": correct}
