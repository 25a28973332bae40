"""Loading: resolve a model name (alias, local dir, hub id), load tokenizer and model with the right device, dtype and
quantization from safetensors, check that a tokenizer or an adapter fits a model.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GenerationConfig

from lora_kit.errors import LorakitError
from lora_kit.models.embedded import ALIASES, materialise_alias
from lora_kit.models.memory import cpu_bf16_is_faster, freed_memory_returned
from lora_kit.rundir import read_run


# ---------------------------------------------------------------------------------------------------- resolving names
def resolve_model(name: str) -> str:
    """A local directory path or hub id for `name`. Aliases are converted to a cached safetensors directory once."""
    if not name:
        raise LorakitError("no model given (model=ALIAS|DIR|HUB_ID)")
    if name in ALIASES:
        return str(materialise_alias(name))
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise LorakitError(f"{p}: expected a model directory (with config.json), got a file")
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise LorakitError(f"{name}: model directory not found")
    return name  # a hub id; from_pretrained fetches it (or finds it in the HF cache when HF_HUB_OFFLINE=1)


# ---------------------------------------------------------------------------------------------------- hardware
def device() -> str:
    """The device training and inference run on: cuda, else mps, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_dtype(pref: str = "auto") -> torch.dtype:
    """bf16 where the hardware runs it fast (on CPU: measured), fp16 on older GPUs, fp32 otherwise."""
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if pref in table:
        return table[pref]
    dev = device()
    if dev == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev == "cpu":
        return torch.bfloat16 if cpu_bf16_is_faster() else torch.float32
    return torch.float32


# ---------------------------------------------------------------------------------------------------- loading
def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer at `path`, with a pad token (unk or eos) when it has none; a load error is one line."""
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise LorakitError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def quantization_config(quantization: str, dtype: torch.dtype, skip_modules: Optional[list[str]] = None):
    """bitsandbytes config: 4bit = NF4 + double quantization (QLoRA), 8bit = LLM.int8. None for `none`."""
    if quantization in (None, "none"):
        return None

    skip = list(skip_modules or [])
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype if dtype != torch.float32
                                  else torch.uint8, llm_int8_skip_modules=skip or None)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip or None)
    raise LorakitError(f"quantization must be none|4bit|8bit, got '{quantization}'")


UNQUANTIZED = ["lm_head", "score", "v_head"]  # heads kept out of bitsandbytes (a resized vocabulary, trained heads)


def load_model(path: str, *, quantization: str = "none", dtype: str = "auto", trust_remote_code: bool = False,
               model_class=None, allow_pickle: bool = False, **kwargs):
    """Load a causal LM (or `model_class`) from safetensors only, frozen base weights in the compute dtype.

    With quantization the embeddings and lm_head stay unquantized (so a resized vocabulary works with QLoRA).
    """
    model_class = model_class or AutoModelForCausalLM
    cdtype = compute_dtype(dtype)
    qconf = quantization_config(quantization, cdtype, skip_modules=UNQUANTIZED)
    load_kw = dict(dtype=cdtype, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle, **kwargs)
    if qconf is not None:
        load_kw["quantization_config"] = qconf
        # each process's own GPU (torchrun/accelerate set LOCAL_RANK); GPU 0 would hold every rank's copy
        load_kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))} if device() == "cuda" else {"": "cpu"}
    try:
        files = _safetensors_files(path) if qconf is not None and not allow_pickle else []
        if files:
            model = _load_converting(model_class, path, files, load_kw)
        else:
            model = model_class.from_pretrained(path, **load_kw)
    except OSError as e:
        hint = ("; it holds pickle weights only: convert them to safetensors, or pass allow_pickle=true if you trust "
                "the file" if not allow_pickle and Path(path).is_dir() and any(Path(path).glob("*.bin")) else "")
        raise LorakitError(f"{path}: cannot load model ({str(e).splitlines()[0]}){hint}") from None
    engine_places = sharded_by_fsdp() or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
    if device() != "cpu" and qconf is None and "device_map" not in kwargs and not engine_places:
        model.to(device())  # (DeepSpeed/FSDP shard the CPU copy onto the GPUs themselves: a whole 65B would not fit)
    return model


def _safetensors_files(path: str) -> list[Path]:
    """The safetensors files of a local checkpoint directory (sharded or not); [] for anything else."""
    d = Path(path)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return [d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [d / "model.safetensors"] if (d / "model.safetensors").is_file() else []


_LOAD_ONLY = {"dtype", "use_safetensors", "quantization_config", "device_map"}  # from_pretrained's, not the config's


def _load_converting(model_class, path: str, files: list[Path], load_kw: dict):
    """from_pretrained for a load that converts every tensor (4/8-bit): the files are read one tensor at a time (pread)
    instead of memory-mapped. transformers keeps its mmap open until the whole load ends, so every page of the
    full-precision checkpoint stays resident meanwhile: a 4-bit load of a 2.1 GB bf16 checkpoint peaked at 2.9 GB,
    most of it file pages it no longer needed (BENCHMARKS.md, "QLoRA memory")."""
    kw = dict(load_kw)
    config, model_kw = AutoConfig.from_pretrained(path, return_unused_kwargs=True,
                                                  trust_remote_code=kw.pop("trust_remote_code"),
                                                  **{k: kw.pop(k) for k in list(kw) if k not in _LOAD_ONLY})
    mapping = getattr(model_class, "_model_mapping", None)  # an Auto class: from_pretrained(None) needs the real one
    if getattr(config, "auto_map", None) or (mapping is not None and type(config) not in mapping):
        return model_class.from_pretrained(path, **load_kw)  # remote code or an unknown architecture: the usual way
    concrete = mapping[type(config)] if mapping is not None else model_class
    handles = [safe_open(str(f), framework="pt", device="cpu", backend="pread") for f in files]
    try:  # lazy slices, as transformers itself passes them: each tensor is read when it is converted
        state = {k: h.get_slice(k) for h in handles for k in h.keys()}
        with freed_memory_returned():
            model = concrete.from_pretrained(None, config=config, state_dict=state, **kw, **model_kw)
    finally:
        for h in handles:
            h.__exit__(None, None, None)
    model.name_or_path = model.config.name_or_path = path  # (peft records it as the adapter's base model)
    if model.can_generate() and (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def check_vocab(model, tokenizer, where: str = "model") -> None:
    """The tokenizer must fit the embedding matrix (rows may be padded, never fewer)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise LorakitError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows; "
                           "use the model directory written by `lorakit extend-vocab`, which holds both")


def sharded_by_fsdp() -> bool:
    """Launched with an accelerate FSDP config. FSDP shards each layer's parameters as one dtype, so QLoRA's 4-bit
    weights are stored as the compute dtype (quantization_config) and the norms/embeddings must not be upcast to fp32
    as prepare_model_for_kbit_training does (TRL skips it for sharded QLoRA too)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def adapter_base(adapter: str) -> str:
    """The base model an adapter was trained on: run.json `base_model`, else adapter_config.json."""
    p = Path(adapter)
    if not (p / "adapter_config.json").is_file():
        raise LorakitError(f"{p}: not an adapter directory (no adapter_config.json)")
    base = read_run(p).get("base_model")
    if not base:
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise LorakitError(f"{p}: cannot tell which base model this adapter needs; pass --model")
    return base


def adapter_tokenizer_template(adapter: Optional[str], base: str) -> tuple[str, str]:
    """(where to load the tokenizer from, template name) for generating with `adapter` over `base`: the adapter's own
    tokenizer (an extended vocabulary travels with it) and its recipe's template win."""
    if not adapter:
        return base, "auto"
    ap = Path(adapter)
    tok_source = str(ap) if (ap / "tokenizer_config.json").is_file() else base
    template = "auto"
    if (ap / "recipe.yaml").is_file():
        template = (yaml.safe_load((ap / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("template", "auto")
    return tok_source, template


def signature(config) -> dict:
    """What an adapter needs of its base: recorded in run.json, checked before an adapter is applied."""
    return {"architectures": list(getattr(config, "architectures", None) or []),
            "hidden_size": getattr(config, "hidden_size", None),
            "num_hidden_layers": getattr(config, "num_hidden_layers", None),
            "vocab_size": getattr(config, "vocab_size", None)}


def check_adapter_fits(adapter: str, model) -> None:
    """Refuse an adapter trained on another base (architecture, hidden size, layers, vocab size), saying how to fix."""
    want = read_run(Path(adapter)).get("base_signature")
    if not want:
        return
    have = signature(getattr(model, "config", model))
    for key in ("architectures", "hidden_size", "num_hidden_layers", "vocab_size"):
        if want.get(key) and have.get(key) and want[key] != have[key]:
            raise LorakitError(f"{adapter}: adapter was trained on a base with {key}={want[key]}, but this model has "
                               f"{key}={have[key]}; pass the base it was trained on (run.json base_model: "
                               f"{read_run(Path(adapter)).get('base_model')})")


# ---------------------------------------------------------------------------------------------------- untrusted files
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
NEVER_LOADED = ("training_args.bin",)  # the Trainer's record of its arguments beside a checkpoint; nothing reads it


def check_adapter_files(adapter) -> None:
    """Every command that reads an adapter asks here first: a local adapter directory must hold its weights as
    adapter_model.safetensors; pickled weights (adapter_model.bin, which peft would load) are refused in one line.
    (merge and svd read the factors themselves, the others through peft.)"""
    p = Path(adapter)
    if not p.is_dir() or (p / ADAPTER_WEIGHTS).is_file():
        return  # a hub id (peft fetches safetensors first), or a safe adapter
    pickled = [f for f in sorted(p.glob("adapter_model.*")) if f.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise LorakitError(f"{pickled[0]}: pickled adapter weights refused (lorakit reads safetensors adapters only; "
                           f"convert it to {ADAPTER_WEIGHTS} if you trust it)")
    raise LorakitError(f"{p / ADAPTER_WEIGHTS}: missing (lorakit reads safetensors adapters only)")


def check_checkpoint(checkpoint) -> None:
    """Before a checkpoint is resumed: every pickled file in it (optimizer, scheduler, RNG states, PPO's state.pt)
    must load with torch.load(weights_only=True) and the Trainer's numpy allowlist, as the Trainer and PPO load them.
    One that holds anything else (a payload that would run code) is refused in one line naming it, instead of the
    library's traceback on resume."""
    from transformers.trainer_pt_utils import safe_globals  # the numpy types the Trainer allows in rng_state.pth

    for f in sorted(Path(checkpoint).iterdir()):
        if f.suffix not in PICKLE_SUFFIXES or f.name in NEVER_LOADED or not f.is_file():
            continue
        try:
            with warnings.catch_warnings(), safe_globals():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols: noise before the one line
                torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as e:
            wanted = re.search(r"GLOBAL (\S+)", str(e))
            why = f"it asks for {wanted.group(1)}" if wanted else "it holds more than tensors or is damaged"
            raise LorakitError(f"{f}: refused: not loadable with torch.load(weights_only=True) ({why}); delete "
                               f"{Path(checkpoint).name} to resume from an earlier checkpoint") from None
