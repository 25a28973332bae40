"""SentencePiece BPE bases (LLaMA-1/2): append new pieces with distinct ordered scores, drop dead pieces, and build the
HF fast tokenizer whose merges follow SentencePiece's own score order so both give the same ids.
"""
from __future__ import annotations

import base64
import json
from itertools import groupby
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import Tokenizer

from lora_kit.errors import LorakitError

SPACE = "\u2581"  # SentencePiece's whitespace symbol
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def load_proto(path):
    """The ModelProto of a SentencePiece `.model` file (user errors name the file)."""
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as e:  # protobuf raises DecodeError; a missing file OSError
        raise LorakitError(f"{path}: not a SentencePiece model ({type(e).__name__})") from None
    if not proto.pieces:
        raise LorakitError(f"{path}: SentencePiece model has no pieces")
    return proto


def check_bpe(proto, path) -> None:
    """Refuse a SentencePiece model that is not BPE (only BPE models can be extended)."""
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise LorakitError(f"{path}: only SentencePiece BPE models can be extended (this one is "
                           f"{proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)})")


def processor(proto, dummy_prefix: bool = True):
    """A SentencePieceProcessor for `proto`; `dummy_prefix=False` encodes a piece's own text as is."""
    if not dummy_prefix and proto.normalizer_spec.add_dummy_prefix:
        proto = copy_proto(proto)
        proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def copy_proto(proto):
    """A deep copy of a SentencePiece ModelProto."""
    out = type(proto)()
    out.CopyFrom(proto)
    return out


def merge_pieces(base, candidates: list[str]) -> tuple[object, list[str], int]:
    """Append `candidates` (best first) not already in `base`, with distinct scores below every base piece.

    Whitespace-only pieces keep their (lowest) base score, so new pieces never change how spaces merge.
    Returns (merged proto, added pieces in order, duplicates skipped).
    """
    merged = copy_proto(base)
    have = {p.piece for p in base.pieces}
    floor = min((p.score for p in base.pieces if p.type == NORMAL and set(p.piece) != {SPACE}), default=0.0)
    added, skipped = [], 0
    for piece in candidates:
        if piece in have:
            skipped += 1
            continue
        have.add(piece)
        new = merged.pieces.add()
        new.piece, new.type = piece, NORMAL
        new.score = floor - 1.0 - len(added)  # distinct and ordered: HF derives merge ranks from these
        added.append(piece)
    return merged, added, skipped


def remove_pieces(proto, drop: set[str]):
    """A copy of `proto` without `drop` (appended pieces only; ids of the pieces before them do not move)."""
    out = copy_proto(proto)
    keep = [p for p in proto.pieces if p.piece not in drop]
    del out.pieces[:]
    out.pieces.extend(keep)
    return out


def hf_merges(proto) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's encoder: the highest-scoring result first.

    SentencePiece merges the adjacent pair whose concatenation scores highest, leftmost on ties. LLaMA's only ties are
    its whitespace-only pieces (one score for all); merging those leftmost-first grows the left run one space at a
    time, so a tied group of them becomes (▁×k, ▁) merges ranked longest-first.
    """
    score = {p.piece: p.score for p in proto.pieces if p.type in (NORMAL, UNUSED)}
    ranked = sorted((p for p in score if len(p) > 1), key=lambda p: -score[p])
    merges = []
    for _, group in groupby(ranked, key=lambda p: score[p]):
        group = list(group)
        if len(group) > 1 and all(set(p) == {SPACE} for p in group):
            merges += [(p[:-1], SPACE) for p in sorted(group, key=len, reverse=True) if p[:-1] in score]
            continue
        for piece in group:
            merges += [(piece[:i], piece[i:]) for i in range(1, len(piece))
                       if piece[:i] in score and piece[i:] in score]
    return merges


def hf_tokenizer_json(proto) -> str:
    """tokenizer.json for `proto`: SentencePiece normalisation (dummy prefix, spaces as ▁), byte fallback, BOS added."""
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = next((p.piece for p in proto.pieces if p.type == UNKNOWN), "<unk>")
    specials = [(i, p.piece) for i, p in enumerate(proto.pieces) if p.type in (UNKNOWN, CONTROL, USER_DEFINED)]
    bos = proto.trainer_spec.bos_piece if proto.trainer_spec.bos_id >= 0 else None
    spec = proto.normalizer_spec
    norm = [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    if spec.remove_extra_whitespaces:  # SentencePiece strips the ends and collapses runs of spaces
        norm[:0] = [{"type": "Strip", "strip_left": True, "strip_right": True},
                    {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if spec.precompiled_charsmap:  # e.g. nmt_nfkc: the same compiled rules SentencePiece applies
        norm.insert(0, {"type": "Precompiled",
                        "precompiled_charsmap": base64.b64encode(spec.precompiled_charsmap).decode()})
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if spec.add_dummy_prefix:
        norm.insert(len(norm) - 1, {"type": "Prepend", "prepend": " "})
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    single = [{"Sequence": {"id": "A", "type_id": 0}}]
    pair = [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]
    post_specials = {}
    if bos:
        single = [{"SpecialToken": {"id": bos, "type_id": 0}}] + single
        pair = [{"SpecialToken": {"id": bos, "type_id": 0}}, pair[0], {"SpecialToken": {"id": bos, "type_id": 1}},
                pair[1]]
        post_specials = {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}}
    doc = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, s in specials],
        "normalizer": {"type": "Sequence", "normalizers": norm},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
                           "special_tokens": post_specials},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(m) for m in hf_merges(proto)]},
    }
    return json.dumps(doc, ensure_ascii=False)


def tokenizer_config(proto, extra: dict | None = None) -> dict:
    """tokenizer_config.json: loads tokenizer.json as written (TokenizersBackend keeps our pipeline)."""
    t = proto.trainer_spec
    ids = {i: p.piece for i, p in enumerate(proto.pieces)}
    cfg = {"tokenizer_class": "TokenizersBackend", "add_bos_token": t.bos_id >= 0, "add_eos_token": False,
           "bos_token": ids.get(t.bos_id), "eos_token": ids.get(t.eos_id), "unk_token": ids.get(t.unk_id),
           "model_max_length": 4096, "clean_up_tokenization_spaces": False}
    if t.pad_id >= 0:
        cfg["pad_token"] = ids[t.pad_id]
    for k, v in (extra or {}).items():
        if k not in ("tokenizer_class", "auto_map", "added_tokens_decoder", "backend", "is_local",
                     "local_files_only", "tokenizer_file", "vocab_file", "legacy", "sp_model_kwargs"):
            cfg[k] = v
    return {k: v for k, v in cfg.items() if v is not None}


def dead_pieces(proto, pieces: list[str], hf_json: str | None = None) -> tuple[list[str], list[str]]:
    """Pieces not produced as one token from their own text: (dead in SentencePiece, dead in the HF tokenizer)."""
    sp = processor(proto, dummy_prefix=False)
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    texts = [p.replace(SPACE, " ") for p in pieces]
    got = sp.encode(texts)
    dead_sp = [p for p, g in zip(pieces, got) if g != [ids[p]]]
    model = Tokenizer.from_str(hf_json or hf_tokenizer_json(proto)).model
    dead_hf = [p for p in pieces if [t.id for t in model.tokenize(p)] != [ids[p]]]
    return dead_sp, dead_hf


def save(proto, out_dir: Path, config_extra: dict | None = None) -> str:
    """Write tokenizer.model, tokenizer.json and tokenizer_config.json; returns the tokenizer.json text."""
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    text = hf_tokenizer_json(proto)
    (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    cfg = tokenizer_config(proto, config_extra)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    sm = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in cfg}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(sm, indent=2) + "\n", encoding="utf-8")
    return text
