"""`lorakit merge --dtype bf16/fp16` of a vocabulary-extended adapter: verified in fp32 against a tolerance measured
from one ulp of the dtype, which a correct merge passes and a wrong one fails."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_kit.cli import main
from lora_kit.errors import LorakitError
from lora_kit.export.common import read_adapter
from lora_kit.export.merge import verify
from merge_helpers import extend_model, make_adapter, peft_logits, probe_ids

WORDS = ["大语言模型", "词表扩充", "继续预训练", "中文能力", "指令微调", "量化部署"]


@pytest.fixture(scope="module")
def extended(tiny_untied_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ext-dtype")
    ext, new_ids = extend_model(tiny_untied_model_dir, root / "ext", WORDS)
    # an SFT adapter that trains the new rows (as `lorakit sft` on an extended model does) and LoRA on every linear
    ad = make_adapter(ext, root / "ad", trainable_token_indices=new_ids, new_token_ids=new_ids)
    return ext, new_ids, ad


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_merge_of_extended_adapter_passes(extended, tmp_path, dtype, torch_dtype):
    ext, new_ids, ad = extended
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(ad), "--output", str(out), "--dtype", dtype]) == 0
    res = json.loads((out / "run.json").read_text())["verification"]
    assert res["ok"] and res["dtype"] == str(torch_dtype)[6:]
    assert 0 < res["max_abs_diff"] <= res["tolerance"] < res["adapter_effect"] / 5  # the check can see the adapter
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch_dtype
    ids = probe_ids(len(AutoTokenizer.from_pretrained(out)), new_ids)
    with torch.no_grad():
        got = model.float()(input_ids=ids).logits
    assert (got - peft_logits(ext, [ad], ids)).abs().max() <= res["tolerance"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_check_fails_a_wrong_merge(extended, tmp_path, dtype):
    ext, new_ids, ad = extended
    other = make_adapter(ext, tmp_path / "other", seed=7, trainable_token_indices=new_ids, new_token_ids=new_ids)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(other), "--output", str(out), "--dtype", "fp32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    model.to(dtype).save_pretrained(tmp_path / "wrong")  # a half-precision model that holds another adapter
    tok = AutoTokenizer.from_pretrained(out)
    with pytest.raises(LorakitError, match="verification failed"):
        verify(ext, [ad], tmp_path / "wrong", "CAUSAL_LM", dtype, tok, [read_adapter(ad)])


def test_missing_token_rows_fail_the_bf16_check(extended, tmp_path):
    ext, new_ids, ad = extended
    lora_only = read_adapter(ad)
    lora_only.rows.clear()  # the merge forgot the trained embedding rows
    model = AutoModelForCausalLM.from_pretrained(ext, dtype=torch.float32)
    sd = {k: lora_only.apply(k, v.float()) if k in lora_only.touched() else v for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "norows")
    AutoTokenizer.from_pretrained(ad).save_pretrained(tmp_path / "norows")
    with pytest.raises(LorakitError, match="verification failed"):
        verify(ext, [ad], tmp_path / "norows", "CAUSAL_LM", torch.bfloat16, AutoTokenizer.from_pretrained(ad),
               [read_adapter(ad)])
