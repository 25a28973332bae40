"""Bounded load test of `lorakit serve` on loopback: N concurrent streaming clients send a fixed number of chat requests
(alternating the base and an adapter) and every answer is checked whole; prints p50/p95 latency, time to first token
and generated tokens/s.

    flock /tmp/lorakit-heavy.lock python benchmarks/serve_load.py [--model smollm2-135m] [--clients 4] [--requests 24]

Without --adapter it builds a LoRA adapter with random (non-zero) B for the model under WORKDIR: the figures are about
serving, not answer quality, so any adapter of the model's shape does.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx

PROMPTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_zh_demo.json"


def random_adapter(model: str, out: Path) -> Path:
    """A LoRA adapter (all linear layers, r 8) with random A and B, saved as a lorakit stage would."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_kit.models.load import load_model, resolve_model, signature

    if (out / "adapter_config.json").is_file():
        return out
    torch.manual_seed(0)
    net = load_model(resolve_model(model), dtype="fp32")
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(net, config)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.mul_(0.01)  # keep the answers readable-ish: a small perturbation of the base
    peft_model.save_pretrained(out, safe_serialization=True)
    (out / "run.json").write_text(json.dumps({"stage": "sft", "base_model": resolve_model(model),
                                              "base_signature": signature(net.config)}))
    return out


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat request: latency, time to first token, tokens, and whether it ended properly."""
    t0 = time.perf_counter()
    first, text, reason, usage, done = None, "", None, None, False
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    return {"ok": False, "error": obj["error"]["message"]}
                if obj.get("usage"):
                    usage = obj["usage"]
                for ch in obj["choices"]:
                    if ch["delta"].get("content"):
                        first = first or time.perf_counter()
                        text += ch["delta"]["content"]
                    reason = ch["finish_reason"] or reason
    except httpx.HTTPError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    ok = done and reason in ("stop", "length") and usage is not None
    return {"ok": ok, "latency": end - t0, "ttft": (first or end) - t0, "tokens": usage["completion_tokens"] if usage
            else 0, "reason": reason, "model": model, "text": text, "error": None if ok else "truncated"}


async def load(url: str, models: list[str], prompts: list[str], clients: int, requests: int, max_tokens: int):
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait((models[i % len(models)], prompts[i % len(prompts)]))
    results = []

    async def worker():
        async with httpx.AsyncClient(timeout=600) as client:
            while not queue.empty():
                model, prompt = queue.get_nowait()
                results.append(await one(client, url, model, prompt, max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return results, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", help="adapter directory (default: a random one built under --workdir)")
    ap.add_argument("--workdir", default="/tmp/lorakit-serve-bench")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--prompts", default=str(PROMPTS), help="alpaca JSON whose last 64 instructions are the prompts")
    args = ap.parse_args()
    adapter = Path(args.adapter) if args.adapter else random_adapter(args.model, Path(args.workdir) / "adapter")
    prompts = [r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
               for r in json.loads(Path(args.prompts).read_text(encoding="utf-8"))[-64:]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lora_kit.cli", "serve", "--model", args.model, "--name", "base", "--adapter",
           f"adapter={adapter}", "--port", str(port), "--dtype", args.dtype, "--max-concurrent", str(args.clients),
           "--max-tokens", str(args.max_tokens)]
    server = subprocess.Popen(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("server failed to start")
                time.sleep(0.5)
        results, wall = asyncio.run(load(url, ["base", "adapter"], prompts, args.clients, args.requests,
                                         args.max_tokens))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    good = [r for r in results if r["ok"]]
    bad = [r for r in results if not r["ok"]]
    lat, ttft = [r["latency"] for r in good], [r["ttft"] for r in good]
    tokens = sum(r["tokens"] for r in good)
    print(f"model {args.model} + adapter, {args.dtype}, {args.clients} concurrent streaming clients, "
          f"{args.requests} requests, max_tokens {args.max_tokens}, greedy")
    print(f"failed or truncated: {len(bad)}" + (f" (first: {bad[0]['error']})" if bad else ""))
    if good:
        print(f"latency p50 {pct(lat, 50):.2f} s  p95 {pct(lat, 95):.2f} s; time to first token p50 "
              f"{pct(ttft, 50):.2f} s  p95 {pct(ttft, 95):.2f} s")
        print(f"generated tokens {tokens} in {wall:.1f} s: {tokens / wall:.1f} tokens/s "
              f"({sum(r['reason'] == 'length' for r in good)} answers hit max_tokens)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
