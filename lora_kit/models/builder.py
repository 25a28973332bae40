"""The model builder every training stage calls: the base loaded with the recipe's model options (quantization, dtype,
allow_pickle, trust_remote_code) and checked against the tokenizer, the token ids a vocabulary-extended base marks as
new, and the adapter attached (new token rows trained in the embedding and, when the head is untied, in the head).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lora_kit.errors import LorakitError
from lora_kit.models.load import check_vocab, load_model
from lora_kit.models.lora import attach_lora, continue_lora, token_row_targets
from lora_kit.rundir import read_run


def new_token_ids(base: str) -> list[int]:
    """The ids a vocabulary-extended base lists in its run.json (written by `lorakit extend-vocab`); [] otherwise."""
    return [int(i) for i in read_run(Path(base)).get("new_token_ids") or []] if Path(base).is_dir() else []


def load_base(cfg, base: str, tokenizer, model_class=None, **kwargs):
    """The base model as the recipe's model section says (quantization, dtype, trust_remote_code, allow_pickle),
    refused when `tokenizer` does not fit its embedding; `kwargs` go to from_pretrained (e.g. num_labels)."""
    model = load_model(base, quantization=cfg.quantization, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                       allow_pickle=cfg.allow_pickle, model_class=model_class, **kwargs)
    check_vocab(model, tokenizer, base)
    return model


def new_rows(model, ids: list[int], base: str) -> dict[str, list[int]]:
    """{module: rows} training the new token ids: the embedding, and the head when it is untied (`token_row_targets`);
    ids outside the embedding are an error naming the base's run.json."""
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    bad = [i for i in ids if not 0 <= i < vocab_rows]
    if bad:
        raise LorakitError(f"{base}/run.json: field 'new_token_ids' has ids outside the embedding "
                           f"(0..{vocab_rows - 1}), e.g. {bad[0]}")
    return token_row_targets(model, sorted(set(ids)))


@dataclass
class Built:
    """A stage's model, ready for its trainer; the new token ids of its base (which run.json records); and the rows
    of them to train as peft's `trainable_token_indices` ({module: rows}, None when none train)."""

    model: object
    new_token_ids: list[int]
    token_rows: Optional[dict[str, list[int]]] = None


def build(cfg, base: str, tokenizer, *, adapter: str = "lora", model_class=None, task_type: str = "CAUSAL_LM",
          modules_to_save: Optional[list[str]] = None, **kwargs) -> Built:
    """Load the base (`load_base`) and attach the stage's adapter. `adapter`: "lora" = a fresh LoRA from `cfg.lora`
    plus the base's new token rows (unless `train_new_tokens=false`); "none" = the loaded base as it is, a TRL trainer
    or the PPO roles attach `lora_config(cfg.lora, trainable_token_indices=built.token_rows)` themselves; anything else
    = an adapter directory to continue training, whose own token rows (if any) train."""
    model = load_base(cfg, base, tokenizer, model_class, **kwargs)
    ids = new_token_ids(base)
    rows = new_rows(model, ids, base) if ids and cfg.train_new_tokens else None
    if adapter == "lora":
        model = attach_lora(model, cfg.lora, trainable_token_indices=rows, modules_to_save=modules_to_save,
                            task_type=task_type, gradient_checkpointing=cfg.gradient_checkpointing)
    elif adapter != "none":
        model, rows = continue_lora(model, adapter, cfg.gradient_checkpointing), None
    return Built(model, ids, rows)
