"""The causal-LM loss of every stage that trains next-token prediction (sft, pretrain): the LM head runs only at
positions whose next token is trained, over chunks of positions, so the logits of a whole batch (4 x 512 x 69k fp32 =
566 MB for a vocab-extended SmolLM2) never exist at once.

A frozen plain head (LoRA SFT: the head is not trained) takes the fused path: each chunk's gradient with respect to the
hidden states is computed right after its loss, in the forward, so no logits outlive their chunk and backward only
scales the saved n x hidden gradient. So does a frozen head whose new rows train through peft's trainable tokens
(vocabulary extension), whose gradient is then formed for those rows only: peft's own forward copies the head with the
rows swapped in and autograd forms the gradient of the whole vocabulary's weight, then keeps its rows. A head that has
a bias, carries hooks (accelerate offload, DeepSpeed ZeRO-3) or a sharded weight (FSDP2) takes the plain chunked path,
where autograd keeps each chunk's log-softmax for backward.
"""
from __future__ import annotations

import torch
import transformers
from peft.tuners.trainable_tokens import TrainableTokensLayer
from peft.utils.other import TrainableTokensWrapper
from torch.nn.functional import cross_entropy, pad
from transformers.trainer_pt_utils import LengthGroupedSampler

# Positions per LM-head chunk. Recomputing each chunk in backward (torch.utils.checkpoint) saved twice the memory but
# cost ~10% time on pretraining at block 512; without recompute the time is unchanged (BENCHMARKS.md "SFT levers").
CHUNK = 1024


class _FrozenHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets` (-100 = ignored), each position times its
    `scale` (None = 1), for a weight that needs no gradient except, optionally, in the rows `index`, which `delta`
    replaces (peft's trainable tokens: the head's weight is the frozen one with those rows swapped for the trained
    ones). d loss / d hidden = scale (softmax - onehot) @ weight, and d loss / d delta = the same matrix's `index`
    columns, transposed, @ hidden, are formed chunk by chunk during the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, scale=None, delta=None, index=None):
        if delta is not None:  # one copy of the head per call, as peft's own forward makes
            weight = weight.index_copy(0, index, delta.to(weight.dtype))
            grad_delta = torch.zeros(delta.shape, dtype=torch.float32, device=delta.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for i in range(0, hidden.shape[0], chunk):
            t = targets[i: i + chunk]
            probs = (hidden[i: i + chunk] @ weight.T).float()  # logits, then softmax in place
            lse = torch.logsumexp(probs, dim=-1)
            valid = t != -100
            picked = t.clamp(min=0).unsqueeze(1)
            w = valid.float() if scale is None else scale[i: i + chunk].float() * valid
            loss += ((lse - probs.gather(1, picked).squeeze(1)) * w).sum()
            probs.sub_(lse.unsqueeze(1)).exp_()
            probs.scatter_add_(1, picked, torch.full_like(lse, -1.0).unsqueeze(1))
            if scale is not None:
                probs.mul_(w.unsqueeze(1))
            elif not valid.all():  # (sft and pretrain pass trained positions only: no pass over the chunk here)
                probs[~valid] = 0
            grad[i: i + chunk] = probs.to(weight.dtype) @ weight
            if delta is not None:
                grad_delta += probs[:, index].T @ hidden[i: i + chunk].float()
        ctx.save_for_backward(grad, grad_delta.to(delta.dtype) if delta is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, grad_delta = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype), None, None, None, None,
                None if grad_delta is None else grad_delta * grad_loss.to(grad_delta.dtype), None)


def _frozen_plain(head) -> bool:
    """A bias-free nn.Linear whose weight is an ordinary frozen tensor and whose forward nothing wraps."""
    weight = getattr(head, "weight", None)
    return (type(head) is torch.nn.Linear and head.bias is None and type(weight) in (torch.Tensor, torch.nn.Parameter)
            and not weight.requires_grad and not _hooked(head))


def _hooked(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def _token_rows(head):
    """(frozen weight, delta, index) when `head` is peft's trainable-tokens layer (TrainableTokensConfig) or wrapper
    (`trainable_token_indices` beside LoRA) over a frozen plain head with one active, unmerged adapter: its forward
    is then `hidden @ base.weight.index_copy(0, index, delta).T`. Else None."""
    if type(head) is TrainableTokensWrapper:
        if head.disable_adapters or _hooked(head):
            return None
        head = head.token_adapter
    if type(head) is not TrainableTokensLayer:
        return None
    active = head.active_adapters
    if (head.disable_adapters or head.merged or _hooked(head) or len(active) != 1
            or active[0] not in head.trainable_tokens_delta or not _frozen_plain(head.base_layer)):
        return None
    delta = head.trainable_tokens_delta[active[0]]
    return head.base_layer.weight, delta, torch.tensor(head.token_indices[active[0]], device=delta.device)


def head_loss_sum(head, hidden, targets, chunk: int = CHUNK, scale=None):
    """Summed cross-entropy of `head(hidden)` (n x hidden_size) against `targets` (n), `chunk` positions at a time;
    with `scale` (n), each position's term times its scale."""
    rows = _token_rows(head) if torch.is_grad_enabled() else None
    if rows is not None and (hidden.requires_grad or rows[1].requires_grad):
        weight, delta, index = rows  # the frozen weight and the trained rows, never peft's merged copy of the head
        return _FrozenHeadLoss.apply(hidden.to(weight.dtype), weight, targets, chunk, scale, delta, index)
    weight = getattr(head, "weight", None)  # accelerate returns fp32 outputs from a bf16 model; the head wants its own
    hidden = hidden.to(weight.dtype) if weight is not None else hidden
    if _frozen_plain(head) and hidden.requires_grad:
        return _FrozenHeadLoss.apply(hidden, weight, targets, chunk, scale)
    if scale is None:
        return sum(cross_entropy(head(hidden[i: i + chunk]).float(), targets[i: i + chunk], ignore_index=-100,
                                 reduction="sum") for i in range(0, hidden.shape[0], chunk))
    return sum((cross_entropy(head(hidden[i: i + chunk]).float(), targets[i: i + chunk], ignore_index=-100,
                              reduction="none") * scale[i: i + chunk].float()).sum()
               for i in range(0, hidden.shape[0], chunk))


class PositionLossTrainer(transformers.Trainer):
    """Computes the loss from the final hidden states at the trained positions (SFT labels only assistant tokens, ~9%
    of a packed alpaca_zh row; pretraining trains all). The model call still goes through every wrapper (DDP, PEFT);
    its own head sees no position (`logits_to_keep` is an all-false mask). Same sum and normaliser as the model's
    loss. Rows with `loss_weights` (SFT's prompt_loss_weight) weigh each predicted token; the normaliser is then the
    sum of the weights instead of the count of labels."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        targets = pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts label t+1
        keep = targets != -100
        weights = inputs.get("loss_weights")
        scale = None if weights is None else pad(weights[:, 1:], (0, 1), value=0.0)[keep]
        outputs = model(**{k: v for k, v in inputs.items() if k not in ("labels", "loss_weights")},
                        logits_to_keep=torch.zeros_like(keep), output_hidden_states=True)
        hidden = outputs.hidden_states[-1][keep]  # after the final norm (transformers ties the last entry to it)
        if hidden.shape[0] == 0:  # nothing trained in this batch: a zero that still has a graph
            loss = outputs.hidden_states[-1].sum() * 0.0
        else:
            loss = head_loss_sum(_unwrap(model).get_output_embeddings(), hidden, targets[keep], CHUNK, scale)
        if num_items_in_batch is None:
            loss = loss / (keep.sum().clamp(min=1) if scale is None else scale.sum().clamp(min=1e-8))
        else:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:  # the trainer averages gradients over processes
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples, device):
        """The normaliser of an accumulated step: transformers counts the labels; weighted rows sum their weights
        (over all processes, as transformers sums the counts when it averages tokens across devices)."""
        if not (batch_samples and "loss_weights" in batch_samples[0]):
            return super()._get_num_items_in_batch(batch_samples, device)
        total = sum(b["loss_weights"][..., 1:].sum() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def _get_train_sampler(self, train_dataset=None):
        """`group_by_length` as transformers does it, but grouped by the *global* batch (processes x per-device batch x
        accumulation): transformers groups by one process's batch, so 2 processes x batch 2 would train on other batches
        than 1 process x batch 4 and the adapters would differ (tests/test_distributed.py)."""
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)

        size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return LengthGroupedSampler(size, dataset=train_dataset if train_dataset is not None else self.train_dataset,
                                    model_input_name="input_ids")


def _unwrap(model):
    while hasattr(model, "module"):  # DDP
        model = model.module
    return model
