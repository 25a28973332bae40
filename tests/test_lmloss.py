"""The shared LM-head loss (`lora_kit.lmloss`): chunked head + cross-entropy gives the model's own loss and gradients,
for pretraining's every-position labels and SFT's masked ones, with trainable embedding rows (tied and untied heads,
the plain chunked path) and with LoRA alone (frozen head, the fused path)."""
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from lora_kit.models.lora import attach_lora, attach_token_rows, token_row_targets
from lora_kit.recipe import LoraArgs
from lora_kit.training import loss as lmloss
from loss_helpers import assert_loss_and_grads_match_the_models_own


def model_for(path, phase):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    rows = token_row_targets(model, list(range(10, 30))) if phase else None  # phase 0, LoRA SFT: the head stays frozen
    if phase == 1:
        return attach_token_rows(model, rows)
    model = attach_lora(model, LoraArgs(r=4, alpha=8, dropout=0.0), trainable_token_indices=rows)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter is a no-op; make LoRA matter
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("phase", [0, 1, 2, "2-unfused"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_loss_and_grads_equal_the_models_own(tiny_model_dir, tiny_untied_model_dir, monkeypatch, phase, tied,
                                                      masked):
    """Phase 0: the fused frozen head; 1 and 2: the fused head with trained rows; 2-unfused: the plain chunked path."""
    model = model_for(tiny_model_dir if tied else tiny_untied_model_dir, 2 if phase == "2-unfused" else phase)
    head = model.get_output_embeddings()
    assert lmloss._frozen_plain(head) == (phase == 0)  # which path this case exercises
    assert (lmloss._token_rows(head) is not None) == (phase != 0)
    if phase == "2-unfused":
        monkeypatch.setattr(lmloss, "_token_rows", lambda head: None)
    torch.manual_seed(0)
    ids = torch.randint(0, 400, (3, 40))
    labels = ids.clone()
    if masked:  # SFT: only some positions are trained
        labels[:, :25] = -100
    inputs = {"input_ids": ids, "labels": labels}
    monkeypatch.setattr(lmloss, "CHUNK", 16)  # several chunks, the last one partial
    trainer = SimpleNamespace(args=SimpleNamespace(average_tokens_across_devices=False))
    assert_loss_and_grads_match_the_models_own(partial(lmloss.PositionLossTrainer.compute_loss, trainer), model, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_frozen_head_equals_cross_entropy_over_full_logits(dtype):
    torch.manual_seed(0)
    head = torch.nn.Linear(24, 300, bias=False, dtype=dtype).requires_grad_(False)
    hidden = torch.randn(37, 24, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 300, (37,))
    targets[[3, 10, 36]] = -100  # ignored positions carry no loss and no gradient
    ours = lmloss.head_loss_sum(head, hidden, targets, chunk=8) * 0.5
    (g_ours,) = torch.autograd.grad(ours, hidden)
    theirs = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum") * 0.5
    (g_theirs,) = torch.autograd.grad(theirs, hidden)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(ours, theirs, **tol)
    torch.testing.assert_close(g_ours, g_theirs, **tol)
    assert g_ours.dtype == dtype and g_ours[[3, 10, 36]].abs().max() == 0 and g_ours.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_with_trained_rows_equals_peft_forward_and_autograd(dtype):
    """peft's trainable-token rows on a frozen head (fp32 rows over a bf16 head in bf16 training): the same loss,
    the same gradients for the hidden states and the rows."""
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    torch.manual_seed(0)
    layer = TrainableTokensLayer(torch.nn.Linear(24, 300, bias=False, dtype=dtype).requires_grad_(False), "default")
    layer.update_layer("default", token_indices=[5, 17, 299, 42])
    delta = layer.trainable_tokens_delta["default"]
    with torch.no_grad():
        delta.copy_(torch.randn(delta.shape) * 3)  # rows the head would not give
    delta.data = delta.data.float()
    hidden = torch.randn(37, 24, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 300, (37,))
    targets[[0, 7, 8]] = torch.tensor([5, 17, 299])  # trained rows as targets too
    targets[[3, 10, 36]] = -100
    assert lmloss._token_rows(layer) is not None
    ours = lmloss.head_loss_sum(layer, hidden, targets, chunk=8) * 0.5
    g_ours = torch.autograd.grad(ours, [hidden, delta])
    theirs = torch.nn.functional.cross_entropy(layer(hidden).float(), targets, reduction="sum") * 0.5
    g_theirs = torch.autograd.grad(theirs, [hidden, delta])
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(ours, theirs, **tol)
    for a, b in zip(g_ours, g_theirs):
        assert a.dtype == b.dtype and b.abs().max() > 0
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("extra", [["dtype=bf16"], ["dtype=bf16", "quantization=4bit"]])
def test_trains_in_bf16_and_qlora_where_accelerate_hands_back_fp32_hidden_states(tiny_model_dir, tmp_path, extra):
    from lora_kit.recipe import load_config
    from lora_kit.stages import sft

    cfg = load_config(sft.Config, "alpaca_zh", [f"model={tiny_model_dir}", "data=zh_sft_mix", "max_samples=32",
                                                 "cutoff_len=128", "batch_size=2", "max_steps=1", "save_steps=1",
                                                 f"output_dir={tmp_path / 'out'}", *extra])
    out = sft.run(cfg)
    assert (out / "run.json").is_file()


@pytest.mark.parametrize("phase", [0, 2, "2-unfused"])  # as in the test above
def test_weighted_positions_give_the_weighted_mean_of_the_models_token_losses(tiny_model_dir, monkeypatch, phase):
    """SFT's prompt_loss_weight: loss and gradients equal sum(w * token loss) / sum(w) from the model's full logits,
    with the trainer's per-batch normaliser and with the accumulated one `_get_num_items_in_batch` returns."""
    model = model_for(tiny_model_dir, 2 if phase == "2-unfused" else phase)
    if phase == "2-unfused":
        monkeypatch.setattr(lmloss, "_token_rows", lambda head: None)
    torch.manual_seed(0)
    ids = torch.randint(0, 400, (3, 40))
    weights = torch.where(torch.rand(3, 40) < 0.3, 1.0, 0.1)
    weights[:, 0] = 0.0
    weights[2, 30:] = 0.0  # padding
    labels = torch.where(weights > 0, ids, -100)
    batch = {"input_ids": ids, "labels": labels, "loss_weights": weights}
    monkeypatch.setattr(lmloss, "CHUNK", 16)
    trainer = SimpleNamespace(args=SimpleNamespace(average_tokens_across_devices=False, world_size=1))
    total = lmloss.PositionLossTrainer._get_num_items_in_batch(trainer, [batch], "cpu")
    assert total.item() == pytest.approx(weights[:, 1:].sum().item())
    for nb in (None, total):
        model.zero_grad()
        ours = lmloss.PositionLossTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=nb)
        ours.backward()
        g_ours = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        logits = model(input_ids=ids).logits[:, :-1].float()
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
        theirs = (per_token * weights[:, 1:]).sum() / weights[:, 1:].sum()
        theirs.backward()
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
        unweighted = per_token.sum() / (labels[:, 1:] != -100).sum()
        assert abs(ours.item() - unweighted.item()) > 1e-3  # the weights changed the loss
        for k, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(g_ours[k], p.grad, atol=1e-6, rtol=1e-4)
