"""Bounded load test of `lorakit serve` on loopback: N concurrent streaming clients send a fixed number of chat requests
(alternating the base and an adapter) and every answer is checked whole; prints p50/p95 latency, time to first token
and generated tokens/s, per back end. With `--backend both` the same prompts go to the transformers and the vLLM back
end and the greedy answers are compared one by one; `--merged` repeats that on the adapter merged into the base.

    flock /tmp/lorakit-heavy.lock python benchmarks/serve_load.py [--model smollm2-135m] [--clients 4] [--requests 24]
        [--backend transformers|vllm|both] [--merged]     # vllm: LORAKIT_VLLM_PYTHON or `make test-vllm`'s venv

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
        queue.put_nowait((i, models[i % len(models)], prompts[i % len(prompts)]))
    results = []

    async def worker():
        async with httpx.AsyncClient(timeout=600) as client:
            while not queue.empty():
                i, model, prompt = queue.get_nowait()
                results.append({"i": i, **await one(client, url, model, prompt, max_tokens)})

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return results, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def serve_and_load(backend: str, model: str, adapter, args, prompts: list[str]):
    """Start `lorakit serve` with this back end, run the load, stop it; returns (results, wall seconds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lora_kit.cli", "serve", "--backend", backend, "--model", model, "--name", "base",
           "--port", str(port), "--dtype", args.dtype, "--max-concurrent", str(args.clients),
           "--max-tokens", str(args.max_tokens)] + (["--adapter", f"adapter={adapter}"] if adapter else [])
    if backend == "vllm":
        cmd += ["--max-model-len", "1024", "--vllm-args", args.vllm_args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    venv = Path.home() / ".cache/lorakit-vllm/venv/bin/python"
    if backend == "vllm" and "LORAKIT_VLLM_PYTHON" not in env and venv.is_file():
        env["LORAKIT_VLLM_PYTHON"] = str(venv)
    log = Path(args.workdir) / f"serve-{backend}.log"
    server = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"{backend} server failed to start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        return asyncio.run(load(url, ["base", "adapter"] if adapter else ["base"], prompts, args.clients,
                                args.requests, args.max_tokens))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def report(backend: str, what: str, results: list[dict], wall: float, args) -> bool:
    """Print one back end's figures; False if any answer failed or was cut off."""
    good = [r for r in results if r["ok"]]
    bad = [r for r in results if not r["ok"]]
    lat, ttft = [r["latency"] for r in good], [r["ttft"] for r in good]
    tokens = sum(r["tokens"] for r in good)
    print(f"[{backend}] {what}, {args.dtype}, {args.clients} concurrent streaming clients, {args.requests} requests, "
          f"max_tokens {args.max_tokens}, greedy")
    print(f"[{backend}] failed or truncated: {len(bad)}" + (f" (first: {bad[0]['error']})" if bad else ""))
    if good:
        print(f"[{backend}] latency p50 {pct(lat, 50):.2f} s  p95 {pct(lat, 95):.2f} s; time to first token p50 "
              f"{pct(ttft, 50):.2f} s  p95 {pct(ttft, 95):.2f} s")
        print(f"[{backend}] generated tokens {tokens} in {wall:.1f} s: {tokens / wall:.1f} tokens/s "
              f"({sum(r['reason'] == 'length' for r in good)} answers hit max_tokens)")
    return not bad


def agreement(a: list[dict], b: list[dict]) -> str:
    """How many greedy answers are equal, per served model (the same request number on both sides)."""
    out, other = [], {r["i"]: r for r in b}
    for model in sorted({r.get("model") for r in a if r.get("model")}):
        mine = [r for r in a if r.get("model") == model]
        same = sum(r.get("text") is not None and r.get("text") == other.get(r["i"], {}).get("text") for r in mine)
        out.append(f"{model} {same}/{len(mine)}")
    return ", ".join(out)


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
    ap.add_argument("--backend", choices=["transformers", "vllm", "both"], default="transformers")
    ap.add_argument("--vllm-args", default="--gpu-memory-utilization 0.2", help="passed to serve --vllm-args")
    ap.add_argument("--merged", action="store_true", help="also serve the adapter merged into the base (fp32)")
    args = ap.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    adapter = Path(args.adapter) if args.adapter else random_adapter(args.model, Path(args.workdir) / "adapter")
    prompts = [r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
               for r in json.loads(Path(args.prompts).read_text(encoding="utf-8"))[-64:]]
    backends = ["transformers", "vllm"] if args.backend == "both" else [args.backend]
    runs = [("base + LoRA adapter", args.model, adapter)]
    if args.merged:
        merged = Path(args.workdir) / "merged"
        if not (merged / "run.json").is_file():
            subprocess.run([sys.executable, "-m", "lora_kit.cli", "merge", "--adapter", str(adapter), "--model",
                            args.model, "--output", str(merged), "--dtype", "fp32", "--force"], check=True)
        runs.append(("the adapter merged into the base", str(merged), None))
    ok = True
    for what, model, ad in runs:
        results = {}
        for backend in backends:
            results[backend], wall = serve_and_load(backend, model, ad, args, prompts)
            ok &= report(backend, what, results[backend], wall, args)
        if len(results) == 2:
            print(f"equal greedy answers, vllm vs transformers ({what}): "
                  f"{agreement(results['transformers'], results['vllm'])}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
