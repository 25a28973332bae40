"""`lorakit extract-lora` recovers a synthetic low-rank fine-tune: deltas, changed embedding rows and norms."""
from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_kit.cli import main
from lora_kit.export.common import read_adapter
from merge_helpers import peft_logits, probe_ids


def test_extract_recovers_low_rank_delta(tiny_untied_model_dir, tmp_path, capsys):
    base = tiny_untied_model_dir
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    truth = {}
    with torch.no_grad():
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"):
            w = model.get_submodule(name).weight
            d = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.05
            w += d
            truth[name + ".weight"] = d
        model.model.embed_tokens.weight[[5, 17, 300]] += 0.5
        model.lm_head.weight[7] -= 0.25
        model.model.layers[1].post_attention_layernorm.weight.mul_(1.5)
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    AutoTokenizer.from_pretrained(base).save_pretrained(tuned)

    out = tmp_path / "extracted"
    assert main(["extract-lora", "--base", str(base), "--tuned", str(tuned), "--rank", "4", "--output", str(out)]) == 0
    assert "max |logits(base + adapter) - logits(tuned)|" in capsys.readouterr().out
    ad = read_adapter(out)
    assert set(ad.lora) == set(truth)
    for k, d in truth.items():
        torch.testing.assert_close(ad.lora[k].delta(), d, atol=1e-5, rtol=0)
    assert ad.rows["model.embed_tokens.weight"][0].tolist() == [5, 17, 300]
    assert ad.rows["lm_head.weight"][0].tolist() == [7]
    assert list(ad.full) == ["model.layers.1.post_attention_layernorm.weight"]
    ids = probe_ids(100, [5, 17, 300, 7])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.testing.assert_close(peft_logits(base, [out], ids), want, atol=1e-4, rtol=0)
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "extract" and run["max_logit_diff"] < 1e-4
    assert json.loads((out / "extract_report.json").read_text())["overall_energy"] > 0.999999


def test_extract_refuses_other_vocab(tiny_untied_model_dir, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_untied_model_dir)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    model.save_pretrained(tmp_path / "tuned")
    code = main(["extract-lora", "--base", str(tiny_untied_model_dir), "--tuned", str(tmp_path / "tuned"),
                 "--rank", "2", "--output", str(tmp_path / "out")])
    assert code == 2 and "extend-vocab" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
