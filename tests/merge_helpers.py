"""Helpers for the export tests: adapters with non-zero LoRA B (a fresh adapter changes nothing) on the tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def make_adapter(base_dir: Path, out: Path, *, seed: int = 0, r: int = 4, alpha: int = 8, targets="all-linear",
                 trainable_token_indices=None, task_type: str = "CAUSAL_LM", model=None, rslora: bool = False,
                 tokenizer_dir: Path | None = None, new_token_ids=None) -> Path:
    """Save a LoRA adapter with random non-zero A/B (and trained token rows), plus run.json and tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    if model is None:
        cls = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
        kw = {"num_labels": 1} if task_type == "SEQ_CLS" else {}
        model = cls.from_pretrained(base_dir, dtype=torch.float32, **kw)
    extra = ({"trainable_token_indices": {"embed_tokens": list(trainable_token_indices)}}
             if trainable_token_indices else {})
    if task_type == "SEQ_CLS":
        extra["modules_to_save"] = ["score"]
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type=task_type, use_rslora=rslora, **extra)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n or "trainable_tokens_delta" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.3)
    pm.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir or base_dir).save_pretrained(out)
    run = {"stage": "sft", "base_model": str(base_dir), "seed": seed, "new_token_ids": list(new_token_ids or [])}
    (out / "run.json").write_text(json.dumps(run))
    return out


def extend_model(base_dir: Path, out: Path, words: list[str]) -> tuple[Path, list[int]]:
    """A vocab-extended copy of a tiny model: tokenizer.add_tokens + resized embeddings (what extend-vocab writes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    n = len(tok)
    tok.add_tokens(words)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    torch.manual_seed(5)
    with torch.no_grad():
        model.get_input_embeddings().weight[n:] = torch.randn(len(tok) - n, model.config.hidden_size) * 0.02
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ids = list(range(n, len(tok)))
    (out / "run.json").write_text(json.dumps({"stage": "extend-vocab", "base_model": str(base_dir),
                                              "new_token_ids": ids}))
    return out, ids


@torch.no_grad()
def peft_logits(base_dir: Path, adapters: list[Path], ids: torch.Tensor, seq_cls: bool = False) -> torch.Tensor:
    """Reference: base + adapters applied one after another by PEFT (merge_and_unload in fp32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if seq_cls:
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = 0
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for a in adapters[:-1]:
        model = PeftModel.from_pretrained(model, a).merge_and_unload()
    model = PeftModel.from_pretrained(model, adapters[-1]).eval()
    return model(input_ids=ids).logits


def probe_ids(vocab: int, extra: list[int] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    row = torch.randint(0, vocab, (16,), generator=g).tolist()
    return torch.tensor([row, (list(extra) + row)[:16]])
