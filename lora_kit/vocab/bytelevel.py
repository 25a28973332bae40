"""Byte-level BPE bases (SmolLM2, LLaMA-3, Qwen): add Chinese pieces as tokens together with the merges that build them
from the base's own segmentation; every new merge yields a token that proves a Han character, so other text is
untouched.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache

from tokenizers import Tokenizer


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def to_bytelevel(text: str) -> str:
    """`text` spelled in the byte-level alphabet, as tokens appear in a byte-level BPE vocabulary."""
    t = byte_to_unicode()
    return "".join(t[b] for b in text.encode("utf-8"))


def from_bytelevel(token: str) -> bytes:
    """The raw UTF-8 bytes a byte-level token stands for."""
    inv = {c: b for b, c in byte_to_unicode().items()}
    return bytes(inv[c] for c in token)


def proves_han(raw: bytes) -> bool:
    """True if any text containing these bytes contains a Han character (CJK Unified, Ext A).

    A 3-byte UTF-8 lead byte plus its second byte fixes a 4096/64-character block: E5–E9 are all Han, E4 is Han except
    the Yijing hexagrams (E4 B7 xx), E3 90–BF is Extension A. Partial characters count, so intermediate tokens qualify.
    """
    for i in range(len(raw) - 1):
        a, b = raw[i], raw[i + 1]
        if 0x80 <= b <= 0xBF and (0xE5 <= a <= 0xE9 or (a == 0xE4 and b != 0xB7) or (a == 0xE3 and b >= 0x90)):
            return True
    return False


def is_bytelevel(doc: dict) -> bool:
    """True if a tokenizer.json describes a byte-level BPE (the SmolLM2/LLaMA-3/Qwen kind)."""
    pre = doc.get("pre_tokenizer") or {}
    kinds = [pre.get("type")] + [p.get("type") for p in pre.get("pretokenizers", [])]
    return (doc.get("model") or {}).get("type") == "BPE" and "ByteLevel" in kinds


class Merger:
    """The base BPE (vocab + ranked merges) that new merges are appended to; encodes single pre-tokens like
    `tokenizers` does."""

    def __init__(self, doc: dict):
        model = doc["model"]
        self.vocab: dict[str, int] = dict(model["vocab"])
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.merges = merges
        self.base_merges = len(merges)
        self.next_id = 1 + max([*self.vocab.values(), *(t["id"] for t in doc.get("added_tokens", []))])

    def encode(self, word: str) -> list[str]:
        """BPE of one pre-token: repeatedly merge the adjacent pair with the lowest rank (leftmost on ties)."""
        parts = list(word)
        while len(parts) > 1:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        return parts

    def add_piece(self, piece: str, budget: int) -> list[str]:
        """Make `piece` one token by merging its current segmentation left to right; returns the tokens created.

        Nothing is added if that would exceed `budget` tokens or create a token that does not prove a Han character.
        """
        bl = to_bytelevel(piece)
        if bl in self.vocab:
            return []
        parts = self.encode(bl)
        plan, acc = [], parts[0]
        for nxt in parts[1:]:
            merged = acc + nxt
            if merged not in self.vocab:
                if not proves_han(from_bytelevel(merged)):
                    return []
                plan.append((acc, nxt, merged))
            elif (acc, nxt) not in self.ranks:
                return []  # exists as a token but is reached another way; adding a second path is not needed
            acc = merged
        if len(plan) > budget:
            return []
        for a, b, merged in plan:
            self.ranks[(a, b)] = len(self.merges)
            self.merges.append((a, b))
            self.vocab[merged] = self.next_id
            self.next_id += 1
        return [m for _, _, m in plan]

    def remove(self, tokens: set[str]) -> None:
        """Drop new tokens (and the merges producing or using them); ids are reassigned densely afterwards."""
        keep = [m for m in self.merges[self.base_merges:] if m[0] + m[1] not in tokens and m[0] not in tokens
                and m[1] not in tokens]
        self.merges = self.merges[:self.base_merges] + keep
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        for t in tokens:
            self.vocab.pop(t, None)

    def new_tokens(self) -> list[str]:
        return [a + b for a, b in self.merges[self.base_merges:]]

    def to_doc(self, base_doc: dict) -> tuple[dict, list[int]]:
        """tokenizer.json with the new tokens appended (dense ids after every base id); returns it and the new ids."""
        doc = copy.deepcopy(base_doc)
        vocab = dict(base_doc["model"]["vocab"])
        start = 1 + max([*vocab.values(), *(t["id"] for t in doc.get("added_tokens", []))])
        new_ids = []
        for i, tok in enumerate(self.new_tokens()):
            vocab[tok] = start + i
            new_ids.append(start + i)
        doc["model"]["vocab"] = vocab
        as_list = isinstance(base_doc["model"]["merges"][0], list) if base_doc["model"]["merges"] else True
        doc["model"]["merges"] = [list(m) if as_list else " ".join(m) for m in self.merges]
        return doc, new_ids


def dead_tokens(doc: dict, tokens: list[str]) -> list[str]:
    """New tokens not produced as one token from their own text by the real `tokenizers` BPE model."""
    model = Tokenizer.from_str(json.dumps(doc, ensure_ascii=False)).model
    vocab = doc["model"]["vocab"]
    return [t for t in tokens if [x.id for x in model.tokenize(t)] != [vocab[t]]]


def base_ids(doc: dict, tokens: list[str]) -> list[list[int]]:
    """The base tokens spelling each new token (for sub-token-mean initialisation)."""
    model = Tokenizer.from_str(json.dumps(doc, ensure_ascii=False)).model
    return [[x.id for x in model.tokenize(t)] for t in tokens]
