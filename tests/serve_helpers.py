"""Helpers for the serve/ui tests: tiny adapters with non-zero LoRA B, free ports, and real servers as subprocesses."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def build_adapter(base_dir: Path, out: Path, seed: int, template: str | None = None, token_rows: list[int] = ()):
    """A LoRA adapter on q/v with random A and B (so it changes the output), and with `token_rows` trained embedding
    rows (random deltas), saved as a lorakit stage would: run.json names `base_dir` as its base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_kit.models.load import signature

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    extra = {"trainable_token_indices": {"embed_tokens": list(token_rows)}} if token_rows else {}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False, **extra))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out, safe_serialization=True)
    if token_rows:
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)  # the extended vocabulary travels with it
    (out / "run.json").write_text(json.dumps({"stage": "sft", "base_model": str(base_dir),
                                              "base_signature": signature(model.config),
                                              "new_token_ids": list(token_rows)}))
    if template:
        (out / "recipe.yaml").write_text(f"template: {template}\n")
    return out


def build_extended_base(base_dir: Path, out: Path, words: list[str]) -> list[int]:
    """The tiny base with `words` added to its vocabulary and its embeddings resized, as `extend-vocab` leaves it
    (run.json lists the new ids); returns them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    old = len(tok)
    tok.add_tokens(words)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    new_ids = list(range(old, len(tok)))
    (out / "run.json").write_text(json.dumps({"stage": "extend-vocab", "base_model": str(base_dir),
                                              "new_token_ids": new_ids}))
    return new_ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll `url` until it answers; fail with the server's output if the process dies first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=2).read()
            return
        time.sleep(0.3)
    raise TimeoutError(url)


@contextlib.contextmanager
def lorakit_server(args: list[str], port: int, health: str = "/health"):
    """`lorakit ARGS --port PORT` as a subprocess, ready when `health` answers; SIGTERM and wait on the way out."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "lora_kit.cli", *args, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}{health}", proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
