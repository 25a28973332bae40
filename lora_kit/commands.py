"""The command table: every `lorakit` command, the module that implements it, its help line and (for training
stages) its default recipe. `cli` parses and dispatches from it; `recipes` and `pipeline` look stages up in it.

A recipe stage's module has `Config` (dataclass) and `run(config) -> Path`; a tool command's module has
`add_arguments(parser)` and `main(args) -> int`. Modules are imported only when their command runs.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Command:
    """One `lorakit` command: its name, the module that implements it, one line of help."""
    name: str
    module: str
    help: str
    recipe: Optional[str] = None  # default recipe: marks a recipe-driven training stage


COMMANDS = [
    Command("extend-vocab", "lora_kit.vocab.extend",
            "train a Chinese vocabulary, merge it into the base tokenizer, resize the model"),
    Command("tokstats", "lora_kit.vocab.tokstats",
            "compare tokenizers on a text file: tokens, chars/token, byte fallback"),
    Command("pretrain", "lora_kit.stages.pretrain",
            "two-phase continued pretraining (new embeddings, then LoRA)", "zh_pretrain"),
    Command("sft", "lora_kit.stages.sft", "LoRA/QLoRA instruction tuning", "alpaca_zh"),
    Command("rm", "lora_kit.stages.rm", "reward model: LoRA + scalar head, pairwise ranking loss", "rm_zh"),
    Command("ppo", "lora_kit.stages.ppo", "RLHF with PPO on LoRA adapters over one shared base", "ppo_zh"),
    Command("grpo", "lora_kit.stages.grpo", "GRPO on LoRA: verifiable, function or reward-model rewards", "grpo_zh"),
    Command("dpo", "lora_kit.stages.dpo", "preference optimisation with LoRA: DPO, IPO, ORPO, SimPO, KTO", "dpo_zh"),
    Command("pipeline", "lora_kit.pipeline.run",
            "extend-vocab -> pretrain -> sft -> (rm -> ppo | dpo | grpo) -> merge -> eval: cached, resumable,"
            " reported"),
    Command("merge", "lora_kit.export.merge", "merge adapters into full weights (hf or gguf), verified"),
    Command("svd", "lora_kit.export.svd", "reduce an adapter's rank or combine adapters by SVD"),
    Command("extract-lora", "lora_kit.export.extract", "extract a LoRA adapter from a fully fine-tuned model"),
    Command("chat", "lora_kit.serve.chat", "talk to a model (+adapter) with its training template, streaming"),
    Command("serve", "lora_kit.serve.api", "OpenAI-compatible API over a base and its adapters (hot-swapped)"),
    Command("ui", "lora_kit.serve.ui", "web page: runs, live curves, start/stop/resume, chat, eval reports"),
    Command("eval", "lora_kit.evaluate.command",
            "CMMLU/C-Eval/MMLU, held-out tasks, bits/char; --suite zh side by side"),
    Command("data", "lora_kit.data.check", "build the bundled Chinese tasks; check a dataset file"),
    Command("recipes", "lora_kit.recipe_cmd", "list recipes, or show one's keys and defaults"),
    Command("estimate", "lora_kit.models.estimate", "estimate memory per device for a model, method and setup"),
]
BY_NAME = {c.name: c for c in COMMANDS}


def stage_module(name: str):
    """The imported module of a command (a recipe stage's has `Config` and `run`)."""
    return importlib.import_module(BY_NAME[name].module)
