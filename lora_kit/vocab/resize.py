"""Embedding resize for an extended vocabulary: new rows are the mean of the base rows of the tokens that spell them
(input embeddings and an untied lm_head alike), padding rows the mean of all base rows; old rows are kept bit for bit.
"""
from __future__ import annotations

import torch

PAD_MULTIPLE = 64  # tensor-core friendly row count, as Chinese-LLaMA and most model configs use


def padded(n: int, multiple: int = PAD_MULTIPLE) -> int:
    """`n` rounded up to a multiple of `multiple` (embedding rows are padded to 64)."""
    return -(-n // multiple) * multiple


def _init_rows(weight: torch.Tensor, base_rows: int, new_ids: list[int], parts: list[list[int]],
               fill_from: int) -> None:
    """Overwrite `new_ids` with sub-token means and every other row from `fill_from` on with the base mean."""
    base = weight[:base_rows].float()
    if new_ids:
        means = torch.stack([base[p].mean(0) if p else base.mean(0) for p in parts])
        weight[torch.tensor(new_ids)] = means.to(weight.dtype)
    taken = set(new_ids)
    others = [i for i in range(fill_from, weight.shape[0]) if i not in taken]
    if others:
        weight[torch.tensor(others)] = base.mean(0).to(weight.dtype)


def resize_model(model, n_tokens: int, base_tokens: int, new_ids: list[int], parts: list[list[int]],
                 multiple: int = PAD_MULTIPLE) -> int:
    """Resize `model` to hold `n_tokens` (padded to a multiple of `multiple`); returns the new row count.

    `base_tokens` rows (the base tokenizer's ids) stay identical; `parts[i]` are base ids spelling `new_ids[i]`.
    """
    old_rows = model.get_input_embeddings().weight.shape[0]
    rows = max(padded(n_tokens, multiple), old_rows)
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    keep = min(base_tokens, old_rows)
    with torch.no_grad():
        model.resize_token_embeddings(rows, mean_resizing=False)
        _init_rows(model.get_input_embeddings().weight, keep, new_ids, parts, fill_from=max(keep, old_rows))
        out = model.get_output_embeddings()
        if out is not None and not tied:
            _init_rows(out.weight, keep, new_ids, parts, fill_from=max(keep, old_rows))
    if tied:
        model.tie_weights()
    model.config.vocab_size = rows
    return rows


def spell(base_tokenizer, tokenizer, new_ids: list[int]) -> list[list[int]]:
    """The base ids that spell each of `tokenizer`'s `new_ids` (the text of the token, encoded by the base)."""
    return [base_tokenizer(tokenizer.decode([i]), add_special_tokens=False)["input_ids"] for i in new_ids]


def grow_to_tokenizer(model, base_tokenizer, tokenizer, rows: int = 0) -> int:
    """Resize a base model for a tokenizer that extends the base's (an adapter trained on an extended vocabulary):
    each new token's rows are the mean of the base rows that spell its text, as `lorakit extend-vocab` initialises
    them, so rows the adapter does not carry match the extended model. The row count is the adapter's recorded
    embedding size `rows` when known, else the tokenizer's padded as extend-vocab pads. Returns the new row count."""
    start = len(base_tokenizer)
    new_ids = list(range(start, len(tokenizer)))
    parts = spell(base_tokenizer, tokenizer, new_ids)
    if rows:
        return resize_model(model, max(len(tokenizer), rows), start, new_ids, parts, multiple=1)
    return resize_model(model, len(tokenizer), start, new_ids, parts)
