"""What the vLLM back end hands over, checked without vLLM: `merge --rows-only` splits an extended-vocabulary adapter
into a base holding the trained rows plus a LoRA-only adapter that gives the same logits under plain peft, and every
registry template becomes a Jinja chat template rendering the same text as lorakit's own."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_kit.cli import main
from lora_kit.templates import TEMPLATES, as_chat_template, segments
from serve_helpers import build_adapter, build_extended_base

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "q1"},
     {"role": "assistant", "content": "a1"}, {"role": "user", "content": 'q2 "quoted"\n{x}'}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "答"}],
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_registry_template_as_jinja_renders_the_same_text(name, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.bos_token, tok.eos_token = tok.bos_token or "<s>", tok.eos_token or "</s>"
    jinja = as_chat_template(TEMPLATES[name])
    for conv in CONVERSATIONS:
        want = "".join(text for text, _ in segments(tok, TEMPLATES[name], conv, generation=conv[-1]["role"] == "user"))
        got = tok.apply_chat_template(conv, chat_template=jinja, tokenize=False, add_generation_prompt=True)
        assert got == want, (name, conv)


@pytest.fixture(scope="module")
def rows_adapter(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rows-only")
    new_ids = build_extended_base(tiny_model_dir, root / "zh-base", ["天气很好", "今天天"])
    return root, build_adapter(root / "zh-base", root / "zh", seed=4, token_rows=new_ids, template="alpaca"), new_ids


def test_rows_only_merge_equals_the_adapter_and_keeps_lora_apart(rows_adapter):
    root, adapter, new_ids = rows_adapter
    out = root / "served"
    assert main(["merge", "--adapter", str(adapter), "--output", str(out), "--rows-only"]) == 0

    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)  # nothing vLLM refuses
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert not config.get("trainable_token_indices") and not config.get("modules_to_save")
    base_rows = load_file(str(root / "zh-base" / "model.safetensors"))["model.embed_tokens.weight"][new_ids]
    merged_rows = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"][new_ids]
    assert not torch.equal(base_rows, merged_rows)  # the trained rows moved into the base

    ids = torch.tensor([[1, 5, 9, *new_ids, 17, 3]])
    base = AutoModelForCausalLM.from_pretrained(root / "zh-base", dtype=torch.float32)
    want = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
    rows_base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    lora_only = PeftModel.from_pretrained(rows_base, str(out / "adapter")).eval()
    got = lora_only(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with lora_only.disable_adapter():  # the LoRA factors really are separate: without them the answer changes
        assert (lora_only(input_ids=ids).logits - want).abs().max() > 1e-3
    run = json.loads((out / "adapter" / "run.json").read_text())
    assert run["base_model"] == str(out.resolve()) and run["new_token_ids"] == new_ids
    assert (out / "adapter" / "recipe.yaml").read_text() == "template: alpaca\n"


def test_rows_only_refuses_what_it_cannot_split(rows_adapter, capsys):
    root, adapter, _ = rows_adapter
    args = ["merge", "--adapter", str(adapter), "--output", str(root / "gguf"), "--rows-only", "--format", "gguf"]
    assert main(args) == 2
    assert "--rows-only writes a transformers directory" in capsys.readouterr().err
    assert not (root / "gguf").exists()


def test_vllm_plan_converts_rows_adapters_and_refuses_what_one_engine_cannot_serve(tiny_model_dir, rows_adapter,
                                                                                     tmp_path):
    from lora_kit.errors import LorakitError
    from lora_kit.serve.vllm import plan

    root, zh, _ = rows_adapter
    a = build_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    b = build_adapter(tiny_model_dir, tmp_path / "b", seed=2, template="chatml")
    p = plan(str(tiny_model_dir), {"a": str(a)}, base_name="base", cache=tmp_path / "cache")
    assert p.adapters == {"a": str(a)} and p.base == str(tiny_model_dir.resolve()) and p.max_rank == 8
    assert p.chat_template is None  # trained with the tokenizer's own template: vLLM uses it as it is
    p = plan(str(tiny_model_dir), {"b": str(b)}, cache=tmp_path / "cache")
    assert p.chat_template.read_text() == as_chat_template(TEMPLATES["chatml"])  # the recipe's registry template

    p = plan(str(tiny_model_dir), {"zh": str(zh)}, cache=tmp_path / "cache")  # rows: split, served over their base
    split = next((tmp_path / "cache").glob("zh-*"))
    assert p.adapters == {"zh": str(split / "adapter")} and p.base == str(split.resolve())
    assert any("refuses trainable_token_indices" in n for n in p.notes)
    again = plan(str(tiny_model_dir), {"zh": str(zh)}, cache=tmp_path / "cache")  # made once per adapter version
    assert again.adapters == p.adapters and len(list((tmp_path / "cache").glob("zh-*"))) == 1

    with pytest.raises(LorakitError, match="need different ones"):
        plan(str(tiny_model_dir), {"a": str(a), "zh": str(zh)}, cache=tmp_path / "cache")
    with pytest.raises(LorakitError, match="one chat template.*tokenizer's own: a; chatml: b"):
        plan(str(tiny_model_dir), {"a": str(a), "b": str(b)}, cache=tmp_path / "cache")


def test_vllm_plan_refuses_a_pickled_adapter(tiny_model_dir, tmp_path):
    from lora_kit.errors import LorakitError
    from lora_kit.serve.vllm import plan

    a = build_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    (a / "adapter_model.safetensors").rename(a / "adapter_model.bin")
    with pytest.raises(LorakitError, match="pickled adapter weights refused"):
        plan(str(tiny_model_dir), {"a": str(a)}, cache=tmp_path / "cache")
