"""`lorakit merge --format gguf --gguf-type q4_k_m|q5_k_m|q6_k`: llama.cpp's own quantizer on a checked f16 file, then
the file run in llama.cpp (its tokens and its top predictions against the merged model). Needs llama-cpp-python (the
optional extra [gguf]); without it the types are refused in one line before anything is merged."""
from __future__ import annotations

import json

import gguf
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lora_kit.export.llamacpp as llamacpp
from lora_kit.cli import main
from lora_kit.errors import LorakitError
from lora_kit.export.gguf_tokenizer import SAMPLE_LINES
from merge_helpers import make_adapter

needs_llama_cpp = pytest.mark.skipif(not llamacpp.available(),
                                     reason="llama-cpp-python not installed (optional extra [gguf]; make test-gguf)")
T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def wide_ext(tmp_path_factory, tiny_model_dir):
    """A vocab-extended LLaMA 256 wide, so its matrices have the 256-column rows k-quants need (the 64-wide tiny
    models would get llama.cpp's fallback types only), with an adapter training LoRA and the new rows."""
    root = tmp_path_factory.mktemp("wide")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    first = len(tok)
    tok.add_tokens(["大语言模型", "词表扩充"])
    tok.save_pretrained(root / "ext")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, initializer_range=0.1, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "ext")
    new_ids = list(range(first, len(tok)))
    ad = make_adapter(root / "ext", root / "ad", trainable_token_indices=new_ids, new_token_ids=new_ids)
    return root / "ext", ad


def merge_gguf(adapter, out, kind) -> int:
    return main(["merge", "--adapter", str(adapter), "--output", str(out), "--format", "gguf", "--gguf-type", kind])


@needs_llama_cpp
@pytest.mark.parametrize("kind,main_type,file_type", [("q4_k_m", T.Q4_K, 15), ("q5_k_m", T.Q5_K, 17),
                                                      ("q6_k", T.Q6_K, 18)])
def test_k_quants_come_from_llama_cpp_and_run_in_it(wide_ext, tmp_path, kind, main_type, file_type):
    _, ad = wide_ext
    assert merge_gguf(ad, tmp_path / "f16", "f16") == 0
    assert merge_gguf(ad, tmp_path / "q", kind) == 0
    run = json.loads((tmp_path / "q" / "run.json").read_text())
    path = tmp_path / "q" / f"model-{kind}.gguf"
    assert run["gguf_file"] == path.name and sorted(p.name for p in path.parent.iterdir()) == [path.name, "run.json"]

    reader = gguf.GGUFReader(str(path))
    assert int(reader.fields["general.file_type"].contents()) == file_type
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == main_type and types["blk.1.ffn_gate.weight"] == main_type
    assert types["token_embd.weight"] not in (T.F16, T.F32)
    assert path.stat().st_size < 0.6 * (tmp_path / "f16" / "model-f16.gguf").stat().st_size

    checks = run["gguf_checks"]
    assert checks["f16"]["tokenization"]["identical"] == len(SAMPLE_LINES)  # the f16 file was checked first
    ran = checks["llama_cpp"]
    assert ran["identical"] == ran["lines"] == len(SAMPLE_LINES)
    assert llamacpp.MIN_CORR[kind] <= ran["logit_correlation"] < 0.9999 and ran["kl"] > 0
    f16 = json.loads((tmp_path / "f16" / "run.json").read_text())["gguf_checks"]["llama_cpp"]
    assert f16["logit_correlation"] > ran["logit_correlation"] and f16["kl"] < ran["kl"]


@needs_llama_cpp
def test_the_llama_cpp_check_fails_on_another_tokenizer_or_other_logits(wide_ext, tmp_path, tiny_model_dir):
    ext, ad = wide_ext
    assert merge_gguf(ad, tmp_path / "f16", "f16") == 0
    path = tmp_path / "f16" / "model-f16.gguf"
    tok = AutoTokenizer.from_pretrained(ext)
    ids = torch.tensor([tok("大语言模型的词表扩充。The quick brown fox.", add_special_tokens=False)["input_ids"]])
    llm = llamacpp.load(path)
    want = llamacpp.logits(llm, ids[0].tolist())[None]
    llm.close()
    ok = llamacpp.check_file(path, "f16", tok, SAMPLE_LINES, ids, want)
    assert ok["logit_correlation"] > 0.999999 and ok["top1_agreement"] == 1.0 and ok["max_logit_diff"] == 0.0
    with pytest.raises(LorakitError, match=r"llama.cpp tokenizes \d+/7 sample lines differently"):
        llamacpp.check_file(path, "f16", AutoTokenizer.from_pretrained(tiny_model_dir), SAMPLE_LINES, ids, want)
    with pytest.raises(LorakitError, match=r"its logits correlate with the merged model's by -?0\.\d+ on the probe"):
        llamacpp.check_file(path, "f16", tok, SAMPLE_LINES, ids, want.roll(1, dims=-1))  # another vocabulary order


def test_k_quants_without_llama_cpp_are_refused_before_merging(wide_ext, tmp_path, monkeypatch, capsys):
    _, ad = wide_ext
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    assert merge_gguf(ad, tmp_path / "q", "q4_k_m") == 2
    err = capsys.readouterr().err
    assert "--gguf-type q4_k_m needs llama.cpp: pip install 'lorakit[gguf]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "q").exists()


@needs_llama_cpp
def test_greedy_generation_from_the_f16_file_follows_transformers(wide_ext, tmp_path):
    """Same prompt ids, greedy, 16 tokens: llama.cpp on the f16 file picks transformers' (fp32, merged) token at every
    step, except where transformers' own choice is a near-tie that f16 weights can flip (top two within 0.05)."""
    from lora_kit.templates import TEMPLATES, prompt_ids

    _, ad = wide_ext
    assert merge_gguf(ad, tmp_path / "f16", "f16") == 0
    merged = tmp_path / "hf"
    assert main(["merge", "--adapter", str(ad), "--output", str(merged)]) == 0
    tok = AutoTokenizer.from_pretrained(merged)
    model = LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    llm = llamacpp.load(tmp_path / "f16" / "model-f16.gguf")
    texts = ["大语言模型的词表扩充", "今天天气很好。", "The quick brown fox", "《红楼梦》成书于1791年",
             "请把下面的句子翻译成英文"]
    equal = 0
    for text in texts:
        ids = prompt_ids(tok, TEMPLATES["alpaca"], [{"role": "user", "content": text}])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        want = out.sequences[0, len(ids):].tolist()
        got = [int(t) for t, _ in zip(llm.generate(ids, temp=0.0, top_k=1, reset=True), range(16))]
        if got == want:
            equal += 1
            continue
        i = next(k for k, (a, b) in enumerate(zip(got, want)) if a != b)
        step = out.logits[i][0]
        assert float(step[want[i]] - step[got[i]]) < 0.05, (text, i)  # a near-tie, not a different model
    llm.close()
    assert equal >= len(texts) - 2
