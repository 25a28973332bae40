"""Shared by the loss tests: a trainer's `compute_loss` against the model's own loss, value and gradients."""
import torch


def assert_loss_and_grads_match_the_models_own(compute_loss, model, batch: dict) -> None:
    """For the per-batch normaliser (None) and the trainer's token count: loss and every trainable gradient equal."""
    n = (batch["labels"][:, 1:] != -100).sum()
    for nb in (None, n):
        model.zero_grad()
        ours = compute_loss(model, dict(batch), num_items_in_batch=nb)
        ours.backward()
        g_ours = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        theirs = model(**batch).loss if nb is None else model(**batch, num_items_in_batch=nb).loss
        theirs.backward()
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
        assert g_ours and all(p.grad is not None for k, p in model.named_parameters() if p.requires_grad)
        for k, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(g_ours[k], p.grad, atol=1e-6, rtol=1e-4)
