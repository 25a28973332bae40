"""What merge, svd and extract-lora share: reading a PEFT LoRA adapter into per-weight deltas, finding its base model,
reading a safetensors checkpoint tensor by tensor, and writing safetensors shards as a stream.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from lora_kit.errors import LorakitError
from lora_kit.models.load import check_adapter_files, resolve_model
from lora_kit.rundir import read_run

PREFIX = "base_model.model."  # how PEFT prefixes every key of the wrapped model in adapter_model.safetensors
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt")


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count -> bytes (decimal units as in `save_pretrained`)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)?\s*", str(text), re.I)
    if not m:
        raise LorakitError(f"--shard-size: expected e.g. 5GB or 500MB, got '{text}'")
    unit = (m.group(2) or "").upper().rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30}[unit]
    return max(1, int(float(m.group(1)) * mult))


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def bound_allocator() -> None:
    """glibc keeps freed tensor memory for reuse (measured: a verified 1.5 GB merge held 1.9 GB RSS, 0.5 GB once
    trimmed). A fixed mmap threshold returns every block over 4 MB to the OS on free. No-op without glibc."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD; fixing it also stops glibc from raising it dynamically


def release_memory() -> None:
    """Return freed heap memory to the OS (glibc malloc_trim); a no-op without glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# ---------------------------------------------------------------------------------------------------- adapters
@dataclass
class Lora:
    """One layer's LoRA factors and scale; `delta()` is the dense update in the stored weight's orientation."""
    A: torch.Tensor  # (r, in) -- or (r, num_embeddings) for an embedding LoRA
    B: torch.Tensor  # (out, r)
    scale: float
    transpose: bool = False  # the weight stores ΔW transposed (embedding LoRA, fan_in_fan_out)
    embedding: bool = False  # saved as lora_embedding_A/B

    def delta(self) -> torch.Tensor:
        d = self.B.float() @ self.A.float()
        d.mul_(self.scale)
        return d.T if self.transpose else d


@dataclass
class Adapter:
    """One adapter directory, keyed by the base checkpoint's weight names (e.g. `model.layers.0.mlp.up_proj.weight`)."""
    path: Path
    config: dict
    lora: dict[str, Lora] = field(default_factory=dict)
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # weight -> (indices, values)
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save: weight -> whole tensor

    @property
    def task_type(self) -> str:
        return self.config.get("task_type") or "CAUSAL_LM"

    def touched(self) -> set[str]:
        return set(self.lora) | set(self.rows) | set(self.full)

    def apply(self, key: str, w: torch.Tensor) -> torch.Tensor:
        """Weight `key` after this adapter (fp32): replaced whole, rows copied, then ΔW = B@A·scale added."""
        if key in self.full:
            w = self.full[key].float().clone()
        if key in self.rows:
            idx, val = self.rows[key]
            if int(idx.max()) >= w.shape[0]:
                raise LorakitError(f"{self.path}: trainable token id {int(idx.max())} is beyond the base model's "
                                   f"{w.shape[0]} embedding rows; merge into the extended model from "
                                   "`lorakit extend-vocab`")
            w = w.index_copy(0, idx, val.float())
        if key in self.lora:
            d = self.lora[key].delta()
            if d.shape != w.shape:
                raise LorakitError(f"{self.path}: LoRA for {key} has shape {tuple(d.shape)}, the base weight "
                                   f"{tuple(w.shape)}: the adapter was trained on another model")
            w = w.add_(d) if w.dtype == torch.float32 and w.is_contiguous() else w.float() + d
        return w


def _scale(config: dict, module: str, r: int) -> float:
    alpha = config.get("lora_alpha", r)
    pattern = config.get("alpha_pattern") or {}
    if pattern:
        alpha = pattern.get(get_pattern_key(list(pattern), module), alpha)
    return alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r


def read_adapter(path) -> Adapter:
    """Load an adapter directory's LoRA factors, trainable token rows and saved modules (all small)."""
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise LorakitError(f"{path}: not an adapter directory (no adapter_config.json)")
    check_adapter_files(path)
    config = json.loads(cfg_file.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise LorakitError(f"{cfg_file}: field 'peft_type' is {config.get('peft_type')}; only LORA adapters merge")
    for flag in ("use_dora", "lora_bias", "layer_replication"):
        if config.get(flag):
            raise LorakitError(f"{cfg_file}: field '{flag}' is set; lorakit does not merge such adapters")
    sd = load_file(str(weights))
    ad = Adapter(path, config)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if m:
            mod, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            factors.setdefault(mod, {})[part] = t
        elif name.endswith(".token_adapter.trainable_tokens_delta"):
            mod = name[: -len(".token_adapter.trainable_tokens_delta")]
            ad.rows[f"{mod}.weight"] = (torch.tensor(_token_indices(config, mod, cfg_file), dtype=torch.long), t)
        else:
            ad.full[name.replace(".modules_to_save.default.", ".")] = t
    for mod, f in factors.items():
        emb = "lora_embedding_A" in f
        A, B = (f.get("lora_embedding_A"), f.get("lora_embedding_B")) if emb else (f.get("lora_A"), f.get("lora_B"))
        if A is None or B is None:
            raise LorakitError(f"{weights}: {mod} has only one of its two LoRA factors")
        ad.lora[f"{mod}.weight"] = Lora(A, B, _scale(config, mod, A.shape[0]),
                                        transpose=emb or bool(config.get("fan_in_fan_out")), embedding=emb)
    return ad


def write_adapter(dst: Path, lora: dict[str, Lora], rank: int, *, rows=None, full=None, task_type="CAUSAL_LM",
                  base_model: Optional[str] = None, fan_in_fan_out: bool = False) -> None:
    """Save factors as a PEFT adapter (scale folded into B: lora_alpha = r) loadable by `PeftModel.from_pretrained`."""
    rows, full = rows or {}, full or {}
    sd = {}
    for key, f in lora.items():
        mod = key[: -len(".weight")]
        a, b = ("lora_embedding_A", "lora_embedding_B") if f.embedding else ("lora_A.weight", "lora_B.weight")
        sd[f"{PREFIX}{mod}.{a}"] = f.A.float().contiguous()
        sd[f"{PREFIX}{mod}.{b}"] = (f.B.float() * f.scale).contiguous()
    for key, (idx, val) in rows.items():
        sd[f"{PREFIX}{key[: -len('.weight')]}.token_adapter.trainable_tokens_delta"] = val.float().contiguous()
    for key, t in full.items():
        sd[f"{PREFIX}{key}"] = t.contiguous()
    tokens = {k[: -len(".weight")].split(".")[-1]: idx.tolist() for k, (idx, _) in rows.items()}
    mts = sorted({k.rsplit(".", 1)[0] for k in full}) or None
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(k[: -len(".weight")] for k in lora) or None,
                        trainable_token_indices=tokens or None, modules_to_save=mts, task_type=task_type,
                        fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=base_model)
    config.save_pretrained(str(dst))
    save_file(sd, str(Path(dst) / "adapter_model.safetensors"), metadata={"format": "pt"})


def _token_indices(config: dict, module: str, where) -> list[int]:
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return spec
    for name, idx in (spec or {}).items():
        if module == name or module.endswith("." + name):
            return idx
    raise LorakitError(f"{where}: trainable token rows for {module} but no matching 'trainable_token_indices'")


def find_base(adapters: list[Path], model: Optional[str] = None) -> str:
    """The base model: `--model`, else the first adapter's run.json `base_model`, else adapter_config.json."""
    if model:
        return resolve_model(model)
    first = Path(adapters[0])
    base = read_run(first).get("base_model")
    if not base and (first / "adapter_config.json").is_file():
        base = json.loads((first / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise LorakitError(f"{first}: neither run.json 'base_model' nor adapter_config.json "
                           "'base_model_name_or_path' names the base model; pass --model")
    return resolve_model(base)


def adapter_tokenizer_dir(adapters: list[Path], base: Path) -> Path:
    """Where the tokenizer comes from: the adapters' own (extended) tokenizer, never the base's when they have one.

    Among adapters with a tokenizer the largest vocabulary wins (the last on a tie: an SFT adapter after pretraining).
    """
    best, size = Path(base), -1
    for a in adapters:
        if any((Path(a) / f).is_file() for f in TOKENIZER_FILES):
            n = len(AutoTokenizer.from_pretrained(a))
            if n >= size:
                best, size = Path(a), n
    return best


def new_token_ids(adapters: list[Path]) -> list[int]:
    """The union of the `new_token_ids` the adapters' run.json files record, sorted."""
    ids: set[int] = set()
    for a in adapters:
        ids.update(read_run(a).get("new_token_ids") or [])
    return sorted(ids)


# ---------------------------------------------------------------------------------------------------- checkpoints
class Checkpoint:
    """A safetensors model directory read one tensor at a time (only one file's mapping open at once)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise LorakitError(f"{path}: expected a local model directory with safetensors weights")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            self.files = None
        else:
            raise LorakitError(f"{self.path}: no model.safetensors or model.safetensors.index.json "
                               "(lorakit reads safetensors only)")
        self._name, self._handle = None, None
        self._headers: dict[str, tuple[int, dict]] = {}
        self.keys: list[str] = []
        self.file_of: dict[str, str] = {}
        for fname in self.shard_files():
            for k in self._open(fname).keys():
                self.keys.append(k)
                self.file_of[k] = fname
        self.close()
        config = self.path / "config.json"
        self.config = json.loads(config.read_text()) if config.is_file() else {}

    def shard_files(self) -> list[str]:
        return sorted(set(self.files.values())) if self.files else ["model.safetensors"]

    def _open(self, fname: str):
        if self._name != fname:
            self.close()
            self._handle, self._name = safe_open(str(self.path / fname), framework="pt"), fname
        return self._handle

    def close(self):
        self._handle, self._name = None, None  # dropping the handle unmaps the file

    def get(self, key: str) -> torch.Tensor:
        """One tensor read with plain file reads into memory of its own: a memory-mapped read (safe_open's
        get_tensor) leaves the touched file pages resident beside the copy, doubling the peak for big tensors."""
        fname = self.file_of[key]
        if fname not in self._headers:
            with open(self.path / fname, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                self._headers[fname] = (8 + n, json.loads(f.read(n)))
        start, header = self._headers[fname]
        info = header[key]
        begin, end = info["data_offsets"]
        t = torch.empty(info["shape"], dtype={v: k for k, v in ST_DTYPES.items()}[info["dtype"]])
        buf = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else bytearray()
        with open(self.path / fname, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buf) != end - begin:
                raise LorakitError(f"{self.path / fname}: truncated while reading {key}")
        return t

    def meta(self, key: str) -> tuple[list[int], torch.dtype]:
        sl = self._open(self.file_of[key]).get_slice(key)
        name = sl.get_dtype()
        return list(sl.get_shape()), {v: k for k, v in ST_DTYPES.items()}.get(name, torch.float32)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def dtype(self) -> torch.dtype:
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if name in table:
            return table[name]
        return next((self.meta(k)[1] for k in self.keys if self.meta(k)[1].is_floating_point), torch.float32)


def tensor_nbytes(shape, dtype: torch.dtype) -> int:
    """Bytes a tensor of `shape` and `dtype` takes, without allocating it."""
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def write_safetensors_stream(path: Path, plan: list[tuple[str, list[int], torch.dtype]], produce) -> None:
    """Write a safetensors file whose tensors are made one at a time by `produce(key)`, in `plan` order.

    safetensors' own `save_file` needs every tensor of the file in memory at once; the format (8-byte header length,
    JSON header, raw little-endian data) lets us write the header from shapes first, so peak memory is one tensor.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype in plan:
        n = tensor_nbytes(shape, dtype)
        header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype in plan:
            t = produce(key)
            if list(t.shape) != list(shape) or t.dtype != dtype:
                raise RuntimeError(f"{key}: produced {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
