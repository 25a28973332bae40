"""`lorakit merge --format gguf`: the file reads back with `gguf` and transformers, right shapes, equal logits."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_kit.cli import main
from merge_helpers import extend_model, make_adapter, peft_logits, probe_ids


@pytest.mark.parametrize("kind,tol", [("f16", 2e-2), ("q8_0", 6e-2)])
def test_gguf_reads_back_with_extended_vocab(tiny_untied_model_dir, tmp_path, kind, tol):
    import gguf

    ext, new_ids = extend_model(tiny_untied_model_dir, tmp_path / "ext", ["大语言模型", "词表扩充"])
    ad = make_adapter(ext, tmp_path / "ad", trainable_token_indices=new_ids, new_token_ids=new_ids)
    out = tmp_path / "gguf"
    assert main(["merge", "--adapter", str(ad), "--output", str(out), "--format", "gguf", "--gguf-type", kind]) == 0
    run = json.loads((out / "run.json").read_text())
    path = out / run["gguf_file"]
    assert path.name == f"model-{kind}.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted([path.name, "run.json"])

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    rows = len(AutoTokenizer.from_pretrained(ext))
    assert [int(x) for x in tensors["token_embd.weight"].shape] == [64, rows]
    assert [int(x) for x in tensors["blk.1.ffn_up.weight"].shape] == [64, 128]
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    assert len(tokens) == rows and tokens[new_ids[0]] == "大语言模型"

    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32).eval()
    assert model.get_input_embeddings().weight.shape[0] == rows
    ids = probe_ids(rows, new_ids)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = peft_logits(ext, [ad], ids)
    assert (got - want).abs().max() < tol * max(1.0, float(want.abs().max()))
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file=path.name)
    assert len(tok) >= rows - 1 and tok.decode([new_ids[1]]).strip() == "词表扩充"


def test_gguf_tied_model(tiny_model_dir, tmp_path):
    ad = make_adapter(tiny_model_dir, tmp_path / "ad", targets=["q_proj", "k_proj", "o_proj"])
    out = tmp_path / "gguf"
    assert main(["merge", "--adapter", str(ad), "--output", str(out), "--format", "gguf"]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    ids = probe_ids(100)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, peft_logits(tiny_model_dir, [ad], ids),
                                   atol=2e-2, rtol=0)
