"""Hidden-state alignment for new embedding rows (`pretrain phaseN.align_weight`): the model reads each block twice,
once with the extended vocabulary and once with every new token replaced by the base tokens that spell it, and the
new rows learn to make the first reading's hidden states match the second's at the positions where both readings
end the same text. Next-token prediction alone teaches a new row what follows it; alignment teaches it to mean what
its spelling meant to the base model, so what the base learnt about those characters (sentiment cues, for one) carries
over instead of being relearnt from a few minutes of text.

The second reading runs with the adapters disabled (the base model as it was), under no_grad, and never reaches the
LM head. Its loss, per position and layer, is |h_new - h_base|^2 / (|h_new|^2 + |h_base|^2), in [0, 2]: scale-free
across layers whose norms differ by orders of magnitude, and bounded where one reading turns a position into an
attention sink (SmolLM2's sink positions reach 100x the norm of the others; with |h_base|^2 alone as the divisor, one
new token that became a sink at init gave a ratio of 21,000 and the loss spiked from 0.35 to 8.8). Averaged over
layers 1..L and over every position but each block's first (the sink of every block).
"""
from __future__ import annotations

import contextlib

import torch

from lora_kit.training.loss import PositionLossTrainer, _unwrap
from lora_kit.vocab.resize import spell


def spelling_table(base_tokenizer, tokenizer, new_ids: list[int], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(parts, lengths): row i of `parts` (rows x K, zero-padded) spells token i in base ids, `lengths[i]` how many;
    a base id spells itself, a new id as `lorakit extend-vocab` initialised its row (`vocab.resize.spell`)."""
    spelt = dict(zip(new_ids, spell(base_tokenizer, tokenizer, new_ids)))
    width = max([1, *(len(p) for p in spelt.values())])
    parts = torch.zeros(rows, width, dtype=torch.long)
    parts[:, 0] = torch.arange(rows)
    lengths = torch.ones(rows, dtype=torch.long)
    for i, p in spelt.items():
        if p:  # a piece the base cannot spell (none in practice) keeps itself: its positions then only match themselves
            parts[i, :len(p)] = torch.tensor(p)
            lengths[i] = len(p)
    return parts, lengths


def spell_out(ids: torch.Tensor, parts: torch.Tensor, lengths: torch.Tensor, pad_id: int):
    """(base_ids B x T', ends B x T): each row of `ids` in base tokens (right-padded with `pad_id`), and for each
    position the index of the base token that ends the same text."""
    lens = lengths[ids]  # B x T
    ends = lens.cumsum(1) - 1
    width = int(lens.sum(1).max())
    out = torch.full((ids.shape[0], width), pad_id, dtype=ids.dtype, device=ids.device)
    mask = torch.arange(parts.shape[1], device=ids.device) < lens.unsqueeze(-1)  # B x T x K
    for b in range(ids.shape[0]):
        seq = parts[ids[b]][mask[b]]
        out[b, :seq.numel()] = seq
    return out, ends


def align_loss(student: tuple, teacher: tuple, ends: torch.Tensor) -> torch.Tensor:
    """Mean over layers 1..L and positions 1..T-1 of |h_s - h_t|^2 / (|h_s|^2 + |h_t|^2), h_t taken at `ends`."""
    idx = ends[:, 1:]
    total = 0.0
    for hs, ht in zip(student[1:], teacher[1:]):
        t = ht.gather(1, idx.unsqueeze(-1).expand(-1, -1, ht.shape[-1])).float()
        s = hs[:, 1:].float()
        total = total + (((s - t) ** 2).sum(-1) / ((s ** 2).sum(-1) + (t ** 2).sum(-1)).clamp(min=1e-6)).mean()
    return total / (len(student) - 1)


class AlignedRowsTrainer(PositionLossTrainer):
    """PositionLossTrainer plus `weight` x the alignment loss above; `parts`/`lengths` from `spelling_table`."""

    def __init__(self, *args, parts: torch.Tensor, lengths: torch.Tensor, weight: float, pad_id: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.parts, self.lengths, self.weight, self.pad_id = parts, lengths, weight, pad_id
        self._last_align = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        ids = inputs["input_ids"]
        parts, lengths = self.parts.to(ids.device), self.lengths.to(ids.device)
        base_ids, ends = spell_out(ids, parts, lengths, self.pad_id)
        disabled = getattr(_unwrap(model), "disable_adapter", None)
        with torch.no_grad(), (disabled() if disabled else contextlib.nullcontext()):
            teacher = model(input_ids=base_ids, logits_to_keep=torch.zeros_like(base_ids, dtype=torch.bool),
                            output_hidden_states=True).hidden_states
        align = align_loss(outputs.hidden_states, teacher, ends)
        self._last_align = align.detach()
        scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
        if scaled and model.training:  # the LM term is already divided over the accumulated micro-batches
            align = align / self.current_gradient_accumulation_steps
        loss = loss + self.weight * align
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._last_align is not None and "loss" in logs:
            logs["align_loss"] = round(float(self._last_align), 6)
        super().log(logs, *args, **kwargs)
