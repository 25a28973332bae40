"""LoRA/QLoRA SFT with TRL + PEFT "by hand": the script a user writes from TRL's SFTTrainer and PEFT quickstarts.

Alpaca records become prompt/completion pairs with the standard Alpaca prompt (the text LLaMA-Factory's `alpaca`
template produces), so TRL trains on the completion only. Without flags every setting not named here is TRL's own
default (bf16 autocast and gradient checkpointing on, no packing); the flags are what benchmarks/compare_peers.py
switches for its *best* mode. Runs in the TRL venv made by benchmarks/setup_peers.sh.

    python trl_sft.py --model DIR --data alpaca_zh_demo.json --output OUT [--quant 4bit] [--packing]
                      [--no-gradient-checkpointing] [--dtype fp32|bf16]
"""
from __future__ import annotations

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--max-samples", type=int, default=512)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--quant", choices=["none", "4bit"], default="none")
    p.add_argument("--packing", action="store_true", help="pack records (TRL's bfd packing, padding-free)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=["default", "fp32", "bf16"], default="default",
                   help="default = TRL's (bf16); fp32 turns bf16 off")
    args = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train").select(range(args.max_samples))

    def to_prompt_completion(ex):
        instruction = ex["instruction"] + ("\n" + ex["input"] if ex.get("input") else "")
        return {"prompt": f"{SYSTEM}### Instruction:\n{instruction}\n\n### Response:\n",
                "completion": ex["output"]}  # SFTTrainer appends EOS

    dataset = dataset.map(to_prompt_completion, remove_columns=dataset.column_names)

    extra = {}
    if args.dtype != "default":
        extra["bf16"] = args.dtype == "bf16"
    if args.no_gradient_checkpointing:
        extra["gradient_checkpointing"] = False
    if args.packing:
        extra["packing"] = True
    bf16 = extra.get("bf16", True)
    config = SFTConfig(output_dir=args.output, max_length=args.max_length, per_device_train_batch_size=args.batch_size,
                       max_steps=args.steps, learning_rate=args.lr, seed=args.seed, logging_steps=5,
                       report_to="none", use_cpu=not torch.cuda.is_available(), **extra)
    # (use_cpu: on a CPU-only machine TRL's default bf16 is refused without it, "You need to assign use_cpu")

    model_kwargs = {"dtype": torch.bfloat16 if bf16 and args.quant == "4bit" else torch.float32}
    if args.quant == "4bit":  # QLoRA as in PEFT's docs: NF4, double quantization
        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args.model, **model_kwargs)

    peft_config = LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()
    trainer.save_model(args.output)


if __name__ == "__main__":
    main()
