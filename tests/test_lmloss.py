"""The shared LM-head loss (`lora_kit.lmloss`): chunked, recomputed head + cross-entropy gives the model's own loss
and gradients, for pretraining's every-position labels and SFT's masked ones, with trainable embedding rows (tied and
untied heads) and LoRA."""
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from lora_kit import lmloss
from lora_kit.models import attach_lora, attach_token_rows, token_row_targets
from lora_kit.recipe import LoraArgs
from loss_helpers import assert_loss_and_grads_match_the_models_own


def model_for(path, phase):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    rows = token_row_targets(model, list(range(10, 30)))
    if phase == 1:
        return attach_token_rows(model, rows)
    model = attach_lora(model, LoraArgs(r=4, alpha=8, dropout=0.0), trainable_token_indices=rows)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter is a no-op; make LoRA matter
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("phase", [1, 2])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_loss_and_grads_equal_the_models_own(tiny_model_dir, tiny_untied_model_dir, monkeypatch, phase, tied,
                                                      masked):
    model = model_for(tiny_model_dir if tied else tiny_untied_model_dir, phase)
    torch.manual_seed(0)
    ids = torch.randint(0, 400, (3, 40))
    labels = ids.clone()
    if masked:  # SFT: only some positions are trained
        labels[:, :25] = -100
    inputs = {"input_ids": ids, "labels": labels}
    monkeypatch.setattr(lmloss, "CHUNK", 16)  # several chunks, the last one partial
    trainer = SimpleNamespace(args=SimpleNamespace(average_tokens_across_devices=False))
    assert_loss_and_grads_match_the_models_own(partial(lmloss.Trainer.compute_loss, trainer), model, inputs)


@pytest.mark.parametrize("extra", [["dtype=bf16"], ["dtype=bf16", "quantization=4bit"]])
def test_trains_in_bf16_and_qlora_where_accelerate_hands_back_fp32_hidden_states(tiny_model_dir, tmp_path, extra):
    from lora_kit.recipe import load_config
    from lora_kit.stages import sft

    cfg = load_config(sft.Config, "alpaca_zh", [f"model={tiny_model_dir}", "data=zh_sft_mix", "max_samples=32",
                                                 "cutoff_len=128", "batch_size=2", "max_steps=1", "save_steps=1",
                                                 f"output_dir={tmp_path / 'out'}", *extra])
    out = sft.run(cfg)
    assert (out / "run.json").is_file()
