"""SFT on a tiny real LLaMA: only LoRA weights change, packing is loss-exact, resume equals an uninterrupted run,
QLoRA trains with 4-bit layers frozen, and the output directory holds exactly the contracted files."""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lora_kit.recipe import load_config
from lora_kit.stages import sft
from loss_helpers import assert_loss_and_grads_match_the_models_own

EXPECTED_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja", "recipe.yaml", "run.json", "metrics.jsonl", "loss.png", "checkpoints",
                  "README.md"}


def cfg_for(model_dir, out, *extra):
    return load_config(sft.Config, "alpaca_zh", [f"model={model_dir}", "data=zh_sft_mix", f"output_dir={out}",
                                                 "max_samples=64", "cutoff_len=128", "batch_size=2", "max_steps=4",
                                                 "save_steps=2", "logging_steps=1", "dtype=fp32",
                                                 "learning_rate=1e-2", *extra])


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_few_steps_change_only_lora_weights(tiny_model_dir, tmp_path):
    base_hash = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    job = sft.setup(cfg_for(tiny_model_dir, tmp_path / "out"))
    before = params(job.model)
    job.trainer.train()
    after = params(job.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora = {n for n in before if "lora_" in n}
    assert changed and changed <= lora
    assert {n for n in lora if "lora_B" in n} <= changed  # B starts at zero: every B moved
    assert hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest() == base_hash


def test_output_directory_contract_and_metrics(tiny_model_dir, tmp_path):
    out = sft.run(cfg_for(tiny_model_dir, tmp_path / "out"))
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert keys and all("lora_" in k for k in keys)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and "lr" in r for r in steps)
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "sft" and run["base_model"] == str(tiny_model_dir) and run["seed"] == 42
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)


def test_existing_run_is_not_overwritten_without_force(tiny_model_dir, tmp_path):
    from lora_kit.errors import LorakitError

    sft.run(cfg_for(tiny_model_dir, tmp_path / "out", "max_steps=1"))
    with pytest.raises(LorakitError, match="holds a finished run; pass force=true"):
        sft.run(cfg_for(tiny_model_dir, tmp_path / "out", "max_steps=1"))
    sft.run(cfg_for(tiny_model_dir, tmp_path / "out", "max_steps=1", "force=true"))


def test_loss_falls(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from conftest import build_tiny_llama, write_jsonl

    # Embeddings of std 0.02 cap the logits a LoRA can reach; a wider init lets a memorisation show.
    model_dir = tmp_path / "wide"
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    build_tiny_llama(model_dir, vocab_size=1200, init_range=0.5)
    data = write_jsonl(tmp_path / "rep.jsonl",
                       [{"instruction": f"重复{i}", "output": "好的好的好的好的"} for i in range(4)])
    out = sft.run(cfg_for(model_dir, tmp_path / "out", f"data={data}", "max_steps=20", "logging_steps=10",
                          "warmup_ratio=0", "lr_scheduler=constant", "batch_size=4", "lora.dropout=0"))
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert losses[-1] < losses[0] * 0.5, losses


def test_packing_gives_same_per_record_loss_as_unpacked(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_kit.data.records import Collator, conversations, pack, read_records, tokenize_conversations

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    convs, _ = conversations(read_records("zh_sft_mix")[:5])
    examples, _ = tokenize_conversations(convs, tok, None, cutoff_len=4096)

    def per_token(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")

    with torch.no_grad():
        single = []
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            single.append(per_token(model(input_ids=ids).logits[0], torch.tensor(ex["labels"])))
        rows = pack(examples, capacity=sum(len(e["input_ids"]) for e in examples))
        assert len(rows) == 1
        batch = Collator(tok.pad_token_id)(rows)
        assert batch["use_cache"] is False  # a cache would make transformers ignore the packing boundaries
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    starts = [i for i, p in enumerate(rows[0]["position_ids"]) if p == 0] + [len(rows[0]["input_ids"])]
    by_length = {len(e["input_ids"]): i for i, e in enumerate(examples)}
    assert len(by_length) == len(examples)
    for s, e in zip(starts, starts[1:]):
        i = by_length[e - s]
        packed = per_token(logits[s:e], torch.tensor(rows[0]["labels"][s:e]))
        mask = torch.tensor(examples[i]["labels"][1:]) != -100
        torch.testing.assert_close(packed[mask], single[i][mask], atol=1e-5, rtol=1e-5)


def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    full = sft.run(cfg_for(tiny_model_dir, tmp_path / "full", "max_steps=6", "save_steps=3"))
    part = sft.run(cfg_for(tiny_model_dir, tmp_path / "part", "max_steps=6", "save_steps=3"))
    # Turn `part` back into a run interrupted after step 3: only checkpoint-3 survives.
    shutil.rmtree(part / "checkpoints" / "checkpoint-6")
    for name in ("run.json", "adapter_model.safetensors"):
        (part / name).unlink()
    sft.run(cfg_for(tiny_model_dir, tmp_path / "part", "max_steps=6", "save_steps=3", "resume=true"))
    a, b = load_file(full / "adapter_model.safetensors"), load_file(part / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_qlora_trains_lora_only_with_4bit_layers(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    job = sft.setup(cfg_for(tiny_model_dir, tmp_path / "out", "quantization=4bit", "max_steps=2"))
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in job.model.modules())
    assert n4 == 2 * 7  # q k v o gate up down in each of the 2 layers
    before = params(job.model)
    job.trainer.train()
    after = params(job.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)


def test_selective_lm_head_loss_equals_the_models_own_loss(tiny_model_dir, tmp_path):
    """The trainer computes logits only where a token is trained; loss and gradients must equal the full-logits path."""
    job = sft.setup(cfg_for(tiny_model_dir, tmp_path / "out", "lora.dropout=0", "packing=false"))
    batch = job.trainer.data_collator([job.trainer.train_dataset[i] for i in range(3)])
    assert_loss_and_grads_match_the_models_own(job.trainer.compute_loss, job.model, batch)
