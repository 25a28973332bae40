"""`lorakit estimate`: parameter counts match real models, byte accounting follows lorakit's setup (fp32 LoRA, NF4 with
fp32 embeddings, ZeRO partitioning), and for small CPU cases weights + gradients + AdamW states match a measurement."""
import json
import re

import pytest

from lora_kit.errors import LorakitError
from lora_kit.models.estimate import GIB, KNOWN, Setup, Shape, estimate, load_shape

# LLaMA configs as written in the published config.json files (there is no hub here).
LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
            "num_attention_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000, "tie_word_embeddings": False}
LLAMA_13B = {**LLAMA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
             "num_hidden_layers": 40}
LLAMA_65B = {**LLAMA_7B, "hidden_size": 8192, "intermediate_size": 22016, "num_attention_heads": 64,
             "num_hidden_layers": 80}


def test_parameter_counts_match_the_published_sizes():
    assert Shape.from_config(LLAMA_7B).params == 6_738_415_616  # LLaMA-7B as counted by transformers
    assert round(Shape.from_config(LLAMA_13B).params / 1e9, 2) == 13.02
    assert round(Shape.from_config(LLAMA_65B).params / 1e9, 2) == 65.29
    for name, cfg in (("llama-7b", LLAMA_7B), ("llama-13b", LLAMA_13B), ("llama-65b", LLAMA_65B)):
        assert Shape.from_config(KNOWN[name]) == Shape.from_config(cfg)


def test_counts_agree_with_a_real_model_and_peft(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lora_kit.models.lora import attach_lora, count_parameters
    from lora_kit.recipe import LoraArgs

    shape, source = load_shape(str(tiny_model_dir))
    assert source.endswith("config.json")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shape.params == sum(p.numel() for p in model.parameters())
    trainable, _ = count_parameters(attach_lora(model, LoraArgs(r=8, target_modules="all-linear")))
    assert shape.lora_params(8) == trainable


def test_byte_accounting():
    s = Shape.from_config(LLAMA_7B)
    lora = estimate(s, Setup(method="lora", dtype="bf16"))
    t = s.lora_params(8)
    assert lora.weights == s.params * 2 + t * 4  # bf16 base + fp32 adapters (peft)
    assert lora.gradients == t * 4 and lora.optimizer == t * 8
    full = estimate(s, Setup(method="full", dtype="bf16", nproc=8, zero=2))
    assert full.weights == s.params * 2  # replicated
    assert full.optimizer == pytest.approx(s.params * 12 / 8)  # fp32 master + m + v, sharded
    z3 = estimate(s, Setup(method="full", dtype="bf16", nproc=8, zero=3))
    assert z3.weights == pytest.approx(full.weights / 8) and z3.gathered > 0
    off = estimate(s, Setup(method="full", dtype="bf16", nproc=8, zero=3, offload=True))
    assert off.optimizer == off.weights == off.gradients == 0
    assert off.cpu_ram == pytest.approx(z3.optimizer + z3.weights + z3.gradients)
    q = estimate(s, Setup(method="qlora", dtype="bf16"))
    assert 3.3 * GIB < q.weights < 4.0 * GIB  # ~0.52 byte/param for linears, bf16 embeddings + head (fp32 under fp16)
    assert estimate(s, Setup(method="qlora", dtype="fp16")).weights - q.weights == s.other_params * 2
    ddp = estimate(s, Setup(method="lora", nproc=2))
    assert ddp.gradients == 2 * lora.gradients  # DDP buckets
    ckpt = estimate(s, Setup(gradient_checkpointing=True, seq_len=2048))
    assert ckpt.activations < estimate(s, Setup(seq_len=2048)).activations / 5
    assert estimate(s, Setup(batch=2)).activations == 2 * lora.activations


def test_readme_setups_fit_their_gpus():
    """The three setups docs/scaling.md recommends (same numbers as printed there)."""
    s7, s13, s65 = (Shape.from_config(c) for c in (LLAMA_7B, LLAMA_13B, LLAMA_65B))
    assert estimate(s7, Setup(method="qlora", seq_len=512, batch=4, gradient_checkpointing=True)).total < 24 * GIB
    assert estimate(s13, Setup(method="lora", seq_len=512, batch=4, nproc=8, zero=2,
                               gradient_checkpointing=True)).total < 40 * GIB
    assert estimate(s65, Setup(method="lora", seq_len=512, batch=4, nproc=16, zero=3,
                               gradient_checkpointing=True)).total < 40 * GIB


def test_errors_are_one_line(tmp_path):
    with pytest.raises(LorakitError, match="no config.json available offline"):
        load_shape("someone/not-cached-anywhere")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(LorakitError, match="missing intermediate_size"):
        load_shape(str(tmp_path))
    with pytest.raises(LorakitError, match="--offload needs --zero"):
        estimate(Shape.from_config(LLAMA_7B), Setup(offload=True))


def test_cli_prints_every_component(tmp_path, capsys):
    from lora_kit.cli import main

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_13B))
    assert main(["estimate", "--model", str(tmp_path), "--nproc", "8", "--zero", "2", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "gradients", "optimizer states", "activations", "total per device", "ZeRO-2"):
        assert word in out
    assert main(["estimate", "--model", "no/such-model"]) == 2
    assert "no config.json available offline" in capsys.readouterr().err


@pytest.mark.slow
def test_weights_and_optimizer_match_measured_rss(tiny_model_dir, tmp_path):
    """benchmarks/estimate_vs_measured.py on a ~45M-parameter LLaMA built here: full fp32 tuning (weights, gradients,
    AdamW states all the size of the model) and LoRA. Within 15% (BENCHMARKS.md has the SmolLM2 figures)."""
    import subprocess
    import sys
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "estimate_vs_measured.py"
    res = subprocess.run([sys.executable, str(bench), "--model", str(tmp_path / "m"), "--cases",
                          "full-fp32,lora-fp32"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = re.findall(r"^(\S+)\s+w\+grad\+opt\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", res.stdout, re.M)
    assert len(rows) == 2, res.stdout
    for case, est, got, ratio in rows:
        assert 0.85 <= float(ratio) <= 1.15, res.stdout


def test_defaults_are_the_recipes(tmp_path, capsys):
    """One source for each default: Setup(), the command line and the recipes' lora/data sections agree (dropout was
    0.0 in Setup and 0.05 on the command line)."""
    import argparse

    from lora_kit.models.estimate import add_arguments
    from lora_kit.recipe import DataArgs, LoraArgs

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model", "x"])
    assert (args.lora_dropout, args.lora_r, args.seq_len) == (Setup().lora_dropout, Setup().lora_r, Setup().seq_len)
    assert (Setup().lora_dropout, Setup().lora_r, Setup().seq_len) == (LoraArgs().dropout, LoraArgs().r,
                                                                         DataArgs().cutoff_len)
