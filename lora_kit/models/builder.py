"""The model builder: the one place a base model is loaded (`load_weights`). Every training stage calls `build`: the
base loaded with the recipe's model options (quantization, dtype, allow_pickle, trust_remote_code) and checked against
the tokenizer, the token ids a vocabulary-extended base marks as new, and the adapter attached (new token rows trained
in the embedding and, when the head is untied, in the head). Generation (eval, chat) calls `load_for_inference`; the
server and extend-vocab's resize call `load_weights`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from peft import PeftModel

from lora_kit.errors import LorakitError
from lora_kit.models.load import (
    adapter_base,
    adapter_tokenizer_template,
    check_adapter_files,
    check_adapter_fits,
    check_vocab,
    load_model,
    load_tokenizer,
    resolve_model,
)
from lora_kit.models.lora import attach_lora, continue_lora, token_row_targets
from lora_kit.rundir import read_run
from lora_kit.vocab.resize import grow_to_tokenizer


def new_token_ids(base: str) -> list[int]:
    """The ids a vocabulary-extended base lists in its run.json (written by `lorakit extend-vocab`); [] otherwise."""
    return [int(i) for i in read_run(Path(base)).get("new_token_ids") or []] if Path(base).is_dir() else []


def load_weights(base: str, *, quantization: str = "none", dtype: str = "auto", trust_remote_code: bool = False,
                 allow_pickle: bool = False, model_class=None, **kwargs):
    """The base's weights with the model options every caller passes the same way (`models.load.load_model`: the only
    call of it in the package)."""
    return load_model(base, quantization=quantization, dtype=dtype, trust_remote_code=trust_remote_code,
                      allow_pickle=allow_pickle, model_class=model_class, **kwargs)


def load_base(cfg, base: str, tokenizer, model_class=None, **kwargs):
    """The base model as the recipe's model section says (quantization, dtype, trust_remote_code, allow_pickle),
    refused when `tokenizer` does not fit its embedding; `kwargs` go to from_pretrained (e.g. num_labels)."""
    model = load_weights(base, quantization=cfg.quantization, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                         allow_pickle=cfg.allow_pickle, model_class=model_class, **kwargs)
    check_vocab(model, tokenizer, base)
    return model


def load_for_inference(model: Optional[str], adapter: Optional[str] = None, *, dtype: str = "auto",
                       quantization: str = "none", trust_remote_code: bool = False):
    """(model, tokenizer, template name) for generation: the adapter's own tokenizer and recipe template win."""
    if not model and not adapter:
        raise LorakitError("give --model and/or --adapter")
    if adapter:
        check_adapter_files(adapter)
    base = resolve_model(model) if model else resolve_model(adapter_base(adapter))
    tok_source, template = adapter_tokenizer_template(adapter, base)
    tokenizer = load_tokenizer(tok_source, trust_remote_code)
    net = load_weights(base, quantization=quantization, dtype=dtype, trust_remote_code=trust_remote_code)
    if adapter and tok_source != base and len(tokenizer) > net.get_input_embeddings().weight.shape[0]:
        # an adapter trained on an extended vocabulary, given the original base: grow the base, no merge needed
        rows = (read_run(Path(adapter)).get("base_signature") or {}).get("vocab_size") or 0
        grow_to_tokenizer(net, load_tokenizer(base, trust_remote_code), tokenizer, rows)
    check_vocab(net, tokenizer, tok_source)
    if adapter:
        check_adapter_fits(adapter, net)
        net = PeftModel.from_pretrained(net, adapter)
    net.eval()
    return net, tokenizer, template


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
