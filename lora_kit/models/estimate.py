"""`lorakit estimate`: memory per device for training a LLaMA-family model, from its config.json alone (no weights are
loaded): weights, gradients, optimizer states, activations, for LoRA, QLoRA or full tuning, DDP or DeepSpeed ZeRO-2/3.

Counts bytes the way ZeRO (Rajbhandari et al. 2020) does, for what lorakit actually runs: peft keeps LoRA weights in
fp32, QLoRA in fp16 upcasts the unquantized parameters to fp32 (in bf16 they stay bf16), torch AdamW keeps two states
in the parameter's dtype, DeepSpeed keeps fp32 master weights + two fp32 states (12 bytes) for 16-bit training.
Activations count the tensors autograd saves in a transformers LlamaDecoderLayer with fused (flash/SDPA) attention.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from huggingface_hub import try_to_load_from_cache

from lora_kit.errors import LorakitError
from lora_kit.models.load import resolve_model
from lora_kit.recipe import DataArgs, LoraArgs

GIB = 2 ** 30
CUDA_CONTEXT = 1.0 * GIB  # CUDA context + allocator slack seen per GPU process (not counted with --device cpu)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights, 8-bit absmax per 64 (double quant), fp32 per 256 blocks
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Architectures known without a download (LLaMA paper table 2; LLaMA-2 config.json): estimate before you fetch.
KNOWN = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=32000),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      vocab_size=32000),
    "llama-33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                      vocab_size=32000),
    "llama-65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                      vocab_size=32000),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000),
}
KNOWN["llama2-7b"], KNOWN["llama2-13b"] = KNOWN["llama-7b"], KNOWN["llama-13b"]


# ---------------------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only LLaMA-style config that decide memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config(cls, cfg: dict, where: str = "config") -> "Shape":
        need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in need if not cfg.get(k)]
        if missing:
            raise LorakitError(f"{where}: not a LLaMA-style decoder config (missing {', '.join(missing)})")
        h, a = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return cls(hidden=h, intermediate=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]),
                   heads=a, kv_heads=int(cfg.get("num_key_value_heads") or a),
                   head_dim=int(cfg.get("head_dim") or h // a), vocab=int(cfg["vocab_size"]),
                   tied=bool(cfg.get("tie_word_embeddings", False)))

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linear layers of one decoder layer, in LINEARS order."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied) and RMSNorm weights: never quantized, never LoRA-wrapped."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int) -> int:
        return self.layers * r * sum(a + b for a, b in self.linears())


def load_shape(model: str) -> tuple[Shape, str]:
    """(shape, where its config came from) for a local directory, alias, known name, or a hub id in the HF cache."""
    path = resolve_model(model)
    if Path(path).is_dir():
        cfg_file = Path(path) / "config.json"
        if not cfg_file.is_file():
            raise LorakitError(f"{path}: no config.json in this directory")
        return Shape.from_config(_read_json(cfg_file), str(cfg_file)), str(cfg_file)
    if model.lower() in KNOWN:
        return Shape.from_config(KNOWN[model.lower()], model), f"built-in {model.lower()} shape"
    cached = None
    try:
        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # a malformed repo id: reported below like any unknown name
        pass
    if isinstance(cached, str):
        return Shape.from_config(_read_json(Path(cached)), cached), cached
    raise LorakitError(f"{model}: no config.json available offline (not a directory, not in the Hugging Face cache, "
                       f"not a built-in shape: {', '.join(sorted(KNOWN))}); pass a directory holding its config.json")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LorakitError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


# ---------------------------------------------------------------------------------------------------- the setup
@dataclass(frozen=True)
class Setup:
    """The training setup an estimate is for: method, dtype, batch shape, processes, ZeRO stage and offload."""
    method: str = "lora"  # lora | qlora | full
    dtype: str = "bf16"  # compute dtype: bf16 | fp16 | fp32
    seq_len: int = DataArgs.cutoff_len
    batch: int = 1  # micro-batch per device; gradient accumulation adds nothing
    nproc: int = 1
    zero: Optional[int] = None  # DeepSpeed ZeRO stage 2 or 3 (FSDP FULL_SHARD ~ 3, SHARD_GRAD_OP ~ 2)
    offload: bool = False  # gradients + optimizer states (ZeRO-3: parameters too) in CPU RAM
    lora_r: int = LoraArgs.r
    lora_dropout: float = LoraArgs.dropout  # the recipes' default, as `--lora-dropout`'s
    gradient_checkpointing: bool = False
    device: str = "gpu"  # gpu adds the CUDA context; cpu measures what the benchmark can check


@dataclass
class Estimate:
    """Estimated bytes per device by kind (weights, gradients, optimizer, activations, ...) with notes."""
    params: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    gathered: float = 0.0  # ZeRO-3: parameters gathered for the layers being computed
    context: float = 0.0
    cpu_ram: float = 0.0  # per process, with offload
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.gathered + self.context


def activation_bytes_per_token(shape: Shape, setup: Setup) -> tuple[float, float, float]:
    """(saved per decoder layer, saved per layer with checkpointing, logits + loss) bytes per token of a micro-batch.

    Per layer: each RMSNorm keeps its fp32 input and normalized output; attention keeps q, k, v and its output (fused
    attention: no seq x seq matrix), o_proj its input; the SwiGLU MLP keeps gate, silu(gate), up and their product.
    Frozen linears keep nothing extra; LoRA A keeps its own copy of the input when it differs from the layer's (dropout
    output + mask, or the 16-bit copy autocast makes of the fp32-cast input). Logits: lm_head output, fp32 copy,
    log-softmax and its gradient."""
    s = shape
    wb = 4 if setup.dtype == "fp32" else 2
    q, kv, h, i = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden, s.intermediate
    layer = 2 * (4 * h + wb * h) + wb * (q + 2 * kv + 2 * q) + wb * 4 * i
    if setup.method != "full":
        lora_inputs = sum(a for a, _ in s.linears())
        if setup.lora_dropout > 0:
            layer += lora_inputs * (1 + wb)
        elif wb == 2:
            layer += lora_inputs * wb
    return layer, wb * h, 12 * s.vocab


def estimate(shape: Shape, setup: Setup) -> Estimate:
    """Bytes per device (and per process in CPU RAM with offload) for training `shape` with `setup`."""
    if setup.method not in ("lora", "qlora", "full"):
        raise LorakitError(f"--method must be lora, qlora or full, got '{setup.method}'")
    if setup.zero not in (None, 2, 3):
        raise LorakitError(f"--zero must be 2 or 3, got {setup.zero}")
    if setup.offload and setup.zero is None:
        raise LorakitError("--offload needs --zero 2 or 3 (DeepSpeed moves states to CPU)")
    if min(setup.seq_len, setup.batch, setup.nproc, setup.lora_r) < 1:
        raise LorakitError("--seq-len, --batch, --nproc and --lora-r must be positive")
    wb = 4 if setup.dtype == "fp32" else 2
    n, zero, notes = setup.nproc, setup.zero, []
    full = setup.method == "full"
    trainable = shape.params if full else shape.lora_params(setup.lora_r)
    # DeepSpeed casts the module to the 16-bit dtype and keeps fp32 master weights in the optimizer; without it the
    # trainer steps the parameters in their own dtype (peft creates LoRA weights in fp32).
    if zero and wb == 2:
        tb, state = 2, 12
    else:
        tb = wb if full else 4
        state = 2 * tb
    frozen = 0.0
    if setup.method == "lora":
        frozen = shape.params * wb
    elif setup.method == "qlora":
        other = 4 if setup.dtype == "fp16" and not zero else wb  # models.freeze_base: fp16 upcasts them to fp32
        frozen = shape.linear_params * NF4_BYTES + shape.other_params * other
        notes.append("QLoRA: NF4 linear layers; embeddings, head and norms unquantized")
    weights = frozen + trainable * tb
    gradients = trainable * tb
    optimizer = trainable * state
    gathered = cpu = 0.0
    if zero is None and n > 1:
        gradients *= 2  # DDP's all-reduce buckets hold a second copy of the gradients
        notes.append("DDP: gradients counted twice (all-reduce buckets)")
    if zero:
        gradients /= n
        optimizer /= n
        if setup.offload:  # ZeRO-Offload: the fp32 gradient partitions and optimizer states live in CPU RAM
            cpu += optimizer + gradients
            optimizer = gradients = 0.0
    if zero == 3:
        weights /= n
        biggest = sum(a * b for a, b in shape.linears()) + 2 * shape.hidden
        gathered = 2 * biggest * (NF4_BYTES if setup.method == "qlora" else wb)  # current layer + prefetched next
        if setup.offload:
            cpu += weights
            weights = 0.0
    tokens = setup.batch * setup.seq_len
    layer, ckpt_layer, logits = activation_bytes_per_token(shape, setup)
    if setup.gradient_checkpointing:
        per_token = shape.layers * ckpt_layer + 2 * layer + logits  # inputs kept; one layer recomputed + its grads
    else:
        per_token = shape.layers * layer + layer + logits  # + one layer's activation gradients in backward
    context = CUDA_CONTEXT if setup.device == "gpu" else 0.0
    return Estimate(shape.params, trainable, weights, gradients, optimizer, tokens * per_token, gathered, context,
                    cpu, notes)


# ---------------------------------------------------------------------------------------------------- command
def add_arguments(p) -> None:
    """Options of `lorakit estimate`: model shape, method, dtype, batch shape, processes, ZeRO."""
    p.add_argument("--model", required=True, help="model directory, alias, hub id in the HF cache, or a built-in "
                                                  f"shape ({', '.join(sorted(KNOWN))})")
    p.add_argument("--method", choices=("lora", "qlora", "full"), default="lora")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--seq-len", type=int, default=Setup.seq_len,
                   help=f"tokens per sequence (recipe cutoff_len; default {Setup.seq_len})")
    p.add_argument("--batch", type=int, default=1, help="micro-batch per device (recipe batch_size; default 1)")
    p.add_argument("--nproc", type=int, default=1, help="total processes (GPUs) across all nodes")
    p.add_argument("--zero", type=int, choices=(2, 3), help="DeepSpeed ZeRO stage (FSDP full shard ~ 3)")
    p.add_argument("--offload", action="store_true", help="ZeRO offload: optimizer states (ZeRO-3: weights too) to CPU")
    p.add_argument("--lora-r", type=int, default=Setup.lora_r, help=f"LoRA rank (all linear layers; default "
                                                                       f"{Setup.lora_r}, as the recipes)")
    p.add_argument("--lora-dropout", type=float, default=Setup.lora_dropout,
                   help=f"LoRA dropout (default {Setup.lora_dropout}, as the recipes)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="gpu adds ~1 GiB CUDA context")


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def render(model: str, source: str, setup: Setup, e: Estimate) -> str:
    """The printed `lorakit estimate` report: one GiB figure per memory kind, the total and the notes."""
    par = "full" if setup.method == "full" else f"LoRA r{setup.lora_r} on all linear layers"
    engine = f"ZeRO-{setup.zero}{' + offload' if setup.offload else ''}" if setup.zero else (
        "DDP" if setup.nproc > 1 else "one device")
    lines = [f"lorakit estimate: {model} ({e.params / 1e9:.2f}B parameters, from {source})",
             f"  {setup.method} ({par}): {e.trainable:,} trainable; {setup.dtype}; {setup.batch} x {setup.seq_len} "
             f"tokens per device; {setup.nproc} process{'es' if setup.nproc > 1 else ''}, {engine}",
             f"  weights           {_gib(e.weights)}",
             f"  gradients         {_gib(e.gradients)}",
             f"  optimizer states  {_gib(e.optimizer)}   (AdamW)",
             f"  activations       {_gib(e.activations)}   (gradient checkpointing "
             f"{'on' if setup.gradient_checkpointing else 'off'})"]
    if e.gathered:
        lines.append(f"  ZeRO-3 gathered   {_gib(e.gathered)}   (layer being computed + prefetched)")
    if e.context:
        lines.append(f"  CUDA context      {_gib(e.context)}   (typical)")
    lines.append(f"  total per device  {_gib(e.total)}")
    if e.cpu_ram:
        lines.append(f"  CPU RAM per process {e.cpu_ram / GIB:.2f} GiB (offloaded states)")
    lines += [f"  note: {n}" for n in e.notes]
    return "\n".join(lines)


def main(args) -> int:
    """`lorakit estimate`: print the memory estimate for the model shape and the setup the options describe."""
    shape, source = load_shape(args.model)
    setup = Setup(method=args.method, dtype=args.dtype, seq_len=args.seq_len, batch=args.batch, nproc=args.nproc,
                  zero=args.zero, offload=args.offload, lora_r=args.lora_r, lora_dropout=args.lora_dropout,
                  gradient_checkpointing=args.gradient_checkpointing, device=args.device)
    print(render(args.model, source, setup, estimate(shape, setup)))
    return 0
