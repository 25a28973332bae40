"""lorakit: adapt open LLaMA-family models to Chinese with LoRA/QLoRA.

The pipeline: vocabulary extension, continued pretraining, SFT, alignment (RM, PPO, DPO), merge and export.
"""
import logging

# bitsandbytes 0.50 warns at import that an optional CPU kernel package is missing; its CPU NF4 path works without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
