"""The tokenizer half of GGUF export: vocabulary, merges and llama.cpp's pre-tokenizer tag written from the HF
tokenizer, and the check that re-tokenizes sample text from the written metadata alone, as llama.cpp would.
"""
from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer

from lora_kit.errors import LorakitError

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"  # llama.cpp's spelling of (?i:'s|...)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# tokenizer.ggml.pre -> the regexes llama.cpp (src/llama-vocab.cpp) applies in turn for it
LLAMACPP_REGEXES = {
    "gpt-2": [_GPT2],
    "llama-bpe": [_CONTRACTIONS + "|" + _LLAMA3],
    "qwen2": [_CONTRACTIONS + "|" + _QWEN2],
    "smollm": [r"\p{N}", _GPT2],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],  # what an unknown tag gets
}
_HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
SPLIT_PATTERNS = {_HF_CONTRACTIONS + "|" + _LLAMA3: "llama-bpe", _HF_CONTRACTIONS + "|" + _QWEN2: "qwen2"}


SAMPLE_LINES = [  # Chinese and English, with the cases pre-tokenizers disagree on: ".\n", digit runs, contractions
    "今天天气很好，我们去公园散步吧。\n大语言模型的中文能力来自词表扩充和继续预训练。",
    "《红楼梦》成书于1791年，共120回；“贾宝玉”和“林黛玉”是主人公。",
    "请把下面的句子翻译成英文：我喜欢在周末读书和写代码。",
    "The quick brown fox jumps over the lazy dog.\nIt's 2024, and we'll see 12345 tokens!",
    "    def main():\n        return x  # two  spaces   and\ttabs\n\n",
    "DON'T stop: I'd say you're right, they've gone; 3.14159 vs 1,000,000.",
    "Mixed 中文 and English: GPT-4o 在2024年发布, price $20/month.",
]


def pre_tokenizer_tag(spec: dict, where) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json `spec`; an error when llama.cpp has none."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert") and pattern in SPLIT_PATTERNS:
            return SPLIT_PATTERNS[pattern]
    raise LorakitError(f"{where}: field 'pre_tokenizer' ({json.dumps(pre)[:160]}) matches none of llama.cpp's "
                       f"pre-tokenizers lorakit maps ({', '.join(t for t in LLAMACPP_REGEXES if t != 'default')}); "
                       "a GGUF would split text differently from training, so none is written")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS before a text by itself (what the GGUF's add_bos_token says)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def add_tokenizer(writer, src: Path, rows: int) -> None:
    """Vocabulary as llama.cpp expects it: byte-level BPE ('gpt2': tokens + merges + pre tag) or SentencePiece."""
    tok = AutoTokenizer.from_pretrained(src)
    if len(tok) > rows:
        raise LorakitError(f"{src}: tokenizer has {len(tok)} tokens, the model {rows} embedding rows")
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    tokens, types, scores = [], [], []
    if (src / "tokenizer.model").is_file():
        sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            types.append(TOKEN_CONTROL if sp.is_control(i) else TOKEN_UNKNOWN if sp.is_unknown(i) else
                         TOKEN_BYTE if sp.is_byte(i) else TOKEN_UNUSED if sp.is_unused(i) else TOKEN_NORMAL)
        model = "llama"
    else:
        spec = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        if spec["model"]["type"] != "BPE":
            raise LorakitError(f"{src}/tokenizer.json: model type {spec['model']['type']}; GGUF export supports "
                               "byte-level BPE or SentencePiece (tokenizer.model)")
        writer.add_tokenizer_pre(pre_tokenizer_tag(spec, src / "tokenizer.json"))
        by_id = {i: t for t, i in spec["model"]["vocab"].items()}
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)]
        types = [TOKEN_NORMAL if i in by_id else TOKEN_UNUSED for i in range(len(tokens))]
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])])
        model = "gpt2"
    for i in range(len(tokens), rows):  # added tokens (the extended vocabulary), then padding rows
        tokens.append(added[i].content if i in added else f"[PAD{i}]")
        types.append((TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED) if i in added else TOKEN_UNUSED)
        scores.append(0.0)
    for i, t in added.items():  # added tokens that overwrite base ids keep their role
        if i < len(tokens) and t.special:
            types[i] = TOKEN_CONTROL
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model == "llama":
        writer.add_token_scores(scores)
    for name, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id),
                        ("pad", tok.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{name}_token_id")(value)
    # BOS exactly as the HF tokenizer adds it (llama.cpp's own default differs between vocabulary types), so a
    # runtime that tokenizes raw text, and a Modelfile's template, give the training ids
    writer.add_add_bos_token(adds_bos(tok))
    writer.add_add_eos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def gguf_field(reader, key):
    """A GGUF metadata value as Python (string, number or list); None when absent."""
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def tokenizer_from_gguf(reader) -> Tokenizer:
    """A byte-level BPE tokenizer built only from the GGUF's metadata, splitting text with llama.cpp's regexes."""
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    types = gguf_field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges") or []]
    tag = gguf_field(reader, "tokenizer.ggml.pre") or "default"
    vocab = {t: i for i, t in enumerate(tokens)}  # every id, so the added tokens below keep their GGUF ids
    bpe = Tokenizer(models.BPE(vocab, merges, ignore_merges=tag == "llama-bpe"))  # llama.cpp sets it for llama-bpe
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), "isolated") for r in LLAMACPP_REGEXES.get(tag, LLAMACPP_REGEXES["default"])]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED])
    bpe.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, types) if k == TOKEN_CONTROL])
    return bpe


def check_tokenization(reader, src: Path, lines: list[str]) -> dict:
    """Ids of each line from the GGUF's own tokenizer metadata against the HF tokenizer; raises on any difference."""
    if gguf_field(reader, "tokenizer.ggml.model") != "gpt2":
        return {"lines": 0, "identical": 0, "note": "SentencePiece vocabulary: llama.cpp tokenizes it as SentencePiece"}
    hf = AutoTokenizer.from_pretrained(src)
    gg = tokenizer_from_gguf(reader)
    bad = [(line, hf(line, add_special_tokens=False)["input_ids"], gg.encode(line, add_special_tokens=False).ids)
           for line in lines]
    bad = [b for b in bad if b[1] != b[2]]
    if bad:
        line, want, got = bad[0]
        raise LorakitError(f"GGUF tokenizer (tokenizer.ggml.pre={gguf_field(reader, 'tokenizer.ggml.pre')}) splits "
                           f"{len(bad)}/{len(lines)} sample lines differently from the HF tokenizer, e.g. {line!r}: "
                           f"{got[:12]} vs {want[:12]}; not written")
    return {"lines": len(lines), "identical": len(lines)}
