"""`lorakit merge` on the tiny LLaMAs: merged logits equal base + adapters (PEFT), extended vocabulary, chains,
heads."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lora_kit.cli import main
from merge_helpers import extend_model, make_adapter, peft_logits, probe_ids


def merged_logits(path, ids, cls=AutoModelForCausalLM):
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_untied_model_dir"])
def test_merge_equals_base_plus_adapter(fixture, request, tmp_path, capsys):
    base = request.getfixturevalue(fixture)
    ad = make_adapter(base, tmp_path / "ad", rslora=True)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(ad), "--output", str(out), "--dtype", "fp32"]) == 0
    assert "max |merged - (base + adapters)|" in capsys.readouterr().out
    ids = probe_ids(len(AutoTokenizer.from_pretrained(base)))
    ref = peft_logits(base, [ad], ids)
    with torch.no_grad():
        bare = AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits
    assert (ref - bare).abs().max() > 1e-2  # the adapter really changes the model
    torch.testing.assert_close(merged_logits(out, ids), ref, atol=1e-5, rtol=0)
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "merge" and run["base_model"] == str(base)
    assert run["verification"]["ok"] and run["verification"]["max_abs_diff"] < 1e-4
    assert not (out / "adapter_config.json").exists()


def test_extended_vocab_and_chained_adapters(tiny_untied_model_dir, tmp_path):
    ext, new_ids = extend_model(tiny_untied_model_dir, tmp_path / "ext",
                                ["大语言模型", "词表扩充", "继续预训练", "中文能力"])
    # pretraining adapter trains the new embedding rows; the SFT adapter on top is LoRA only (Chinese-Alpaca order)
    pt = make_adapter(ext, tmp_path / "pt", seed=1, trainable_token_indices=new_ids, new_token_ids=new_ids)
    sft = make_adapter(ext, tmp_path / "sft", seed=2, targets=["q_proj", "v_proj", "down_proj"], new_token_ids=new_ids)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(pt), "--adapter", str(sft), "--output", str(out), "--dtype", "fp32"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(AutoTokenizer.from_pretrained(ext)) and "大语言模型" in tok.get_vocab()
    ids = probe_ids(len(tok), new_ids)
    torch.testing.assert_close(merged_logits(out, ids), peft_logits(ext, [pt, sft], ids), atol=1e-5, rtol=0)
    assert json.loads((out / "run.json").read_text())["new_token_ids"] == new_ids


def test_tokenizer_comes_from_adapter_not_base(tiny_model_dir, tmp_path):
    ext, new_ids = extend_model(tiny_model_dir, tmp_path / "ext", ["新词甲", "新词乙"])
    ad = make_adapter(ext, tmp_path / "ad", trainable_token_indices=new_ids, new_token_ids=new_ids)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(ext)  # the base dir now holds the short tokenizer
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(ad), "--output", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(AutoTokenizer.from_pretrained(tiny_model_dir)) + 2
    assert tok("新词甲")["input_ids"] == [new_ids[0]]
    ids = probe_ids(len(tok), new_ids)
    torch.testing.assert_close(merged_logits(out, ids), peft_logits(ext, [ad], ids), atol=1e-5, rtol=0)


def test_reward_model_keeps_score_head(tiny_untied_model_dir, tmp_path):
    ad = make_adapter(tiny_untied_model_dir, tmp_path / "rm", task_type="SEQ_CLS", targets=["q_proj", "v_proj"])
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(ad), "--output", str(out), "--dtype", "fp32"]) == 0
    ids = probe_ids(100)
    ref = peft_logits(tiny_untied_model_dir, [ad], ids, seq_cls=True)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=0)


def test_shards_and_bf16(tiny_untied_model_dir, tmp_path):
    ad = make_adapter(tiny_untied_model_dir, tmp_path / "ad")
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(ad), "--output", str(out), "--dtype", "bf16", "--shard-size", "200KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ids = probe_ids(100)
    ref = peft_logits(tiny_untied_model_dir, [ad], ids)
    with torch.no_grad():
        assert (model.float()(input_ids=ids).logits - ref).abs().max() < 0.05


def test_qlora_adapter_merges_into_full_precision_base(tiny_untied_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from lora_kit.models.load import load_model

    try:
        q = load_model(str(tiny_untied_model_dir), quantization="4bit", dtype="fp32")
    except Exception as e:  # pragma: no cover - depends on the bitsandbytes CPU backend
        pytest.skip(f"4-bit loading unavailable: {e}")
    ad = make_adapter(tiny_untied_model_dir, tmp_path / "qlora", model=q, targets=["q_proj", "up_proj"])
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(ad), "--output", str(out), "--dtype", "fp32"]) == 0
    ids = probe_ids(100)
    torch.testing.assert_close(merged_logits(out, ids), peft_logits(tiny_untied_model_dir, [ad], ids),
                               atol=1e-5, rtol=0)
