"""GGUF export of a merged LLaMA-family directory through the `gguf` package: tensors streamed one at a time (f32, f16,
bf16 or q8_0), tokenizer included with its extended vocabulary, read back and (for small models) logits checked.
The k-quants (q4_k_m, q5_k_m, q6_k) are llama.cpp's own: a checked f16 file goes through its quantizer
(`export.llamacpp`). Wherever llama-cpp-python is installed, every file is also run in llama.cpp before it is kept.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lora_kit.errors import LorakitError
from lora_kit.export import llamacpp
from lora_kit.export.common import Checkpoint
from lora_kit.export.gguf_tokenizer import SAMPLE_LINES, add_tokenizer, check_tokenization, gguf_field
from lora_kit.export.verify import model_logits, probe_batch

# model_type -> (gguf.MODEL_ARCH member, q/k rows permuted): llama.cpp runs LLAMA with interleaved RoPE pairs, QWEN2
# with NEOX-style halves (HF's own layout), as its convert_hf_to_gguf.py writes them
ARCHES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}
CHECK_LOGITS_MAX_BYTES = 2 * 10**9  # the transformers GGUF loader holds the whole model dequantized in fp32
LONG_PROBE = 2048  # positions the logits check covers (or the model's context, when shorter)


def rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF stores q/k rows as [all first halves | all second halves] per head; llama.cpp interleaves the pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _qtype(kind: str, shape) -> "object":
    T = gguf.GGMLQuantizationType
    if len(shape) < 2 or kind == "f32":
        return T.F32
    if kind == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return T.Q8_0
    return {"bf16": T.BF16, "f16": T.F16, "q8_0": T.F16}[kind]


def _convert(t: torch.Tensor, qtype) -> np.ndarray:
    arr = t.float().numpy()
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return arr.astype(np.float32)
    if qtype == T.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, qtype).view(np.uint8)


def rope_parameters(cfg: dict) -> dict:
    """The config's RoPE parameters in transformers 5 form (`rope_parameters`, or the older `rope_scaling`)."""
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(cfg.get("rope_parameters") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta") or 10000.0)
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """Plain RoPE's inverse frequencies (what both transformers and llama.cpp start from)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def add_rope(writer, cfg: dict, head_dim: int, where) -> dict:
    """Write RoPE as llama.cpp reads it (as its convert_hf_to_gguf.py does); return extra tensors (llama3's
    `rope_freqs`). Types llama.cpp cannot express are refused: the GGUF would run plain RoPE."""
    rope = rope_parameters(cfg)
    kind = rope["rope_type"]
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if kind == "default":
        return {}
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return {}
    if kind == "llama3":  # per-frequency divisors, stored as a tensor
        conf = LlamaConfig(**{**cfg, "rope_parameters": rope})
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](conf, "cpu")
        return {"rope_freqs.weight": default_inv_freq(float(rope["rope_theta"]), head_dim) / scaled.float()}
    if kind == "yarn":
        extra = {k: rope[k] for k in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim")
                 if rope.get(k) is not None and not (k, rope[k]) in (("beta_fast", 32), ("beta_slow", 1))}
        if extra:
            raise LorakitError(f"{where}: RoPE yarn with {extra}; lorakit writes yarn with its default betas only")
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                                 or cfg["max_position_embeddings"]))
        return {}
    raise LorakitError(f"{where}: field 'rope_parameters.rope_type' is '{kind}'; GGUF export writes default, linear, "
                       "llama3 and yarn RoPE")


GGUF_TYPES = ("f16", "bf16", "q8_0", "f32", *llamacpp.KQUANTS)


def export_gguf(src: Path, dst_dir: Path, kind: str = "f16", name: str | None = None) -> tuple[Path, dict]:
    """Convert the merged model directory `src` into `dst_dir/model-<kind>.gguf`, verified; return it and the checks'
    figures. A k-quant is llama.cpp's quantization of a checked f16 file, which is then removed."""
    if kind not in llamacpp.KQUANTS:
        path, plan, names = write_gguf(src, dst_dir, kind, name)
        checks = check_gguf(path, src, plan, names)
        if llamacpp.available():
            checks["llama_cpp"] = check_in_llama_cpp(path, src, kind)
        return path, checks
    llamacpp.require(f"--gguf-type {kind}")
    f16, plan, names = write_gguf(src, dst_dir, "f16", name, filename=f".model-f16-for-{kind}.gguf")
    try:
        checks = {"f16": check_gguf(f16, src, plan, names)}
        path = Path(dst_dir) / f"model-{kind}.gguf"
        print(f"lorakit merge: quantizing to {kind} with llama.cpp")
        llamacpp.quantize(f16, path, kind)
    finally:
        f16.unlink(missing_ok=True)
    reader = gguf.GGUFReader(str(path))
    checks["tokenization"] = check_tokenization(reader, src, SAMPLE_LINES)
    checks["llama_cpp"] = check_in_llama_cpp(path, src, kind)
    checks["bytes"] = path.stat().st_size
    return path, checks


def check_in_llama_cpp(path: Path, src: Path, kind: str) -> dict:
    """`llamacpp.check_file` on the probe text and ids, against the merged model's fp32 logits; prints the figures."""
    tok = AutoTokenizer.from_pretrained(src)
    ckpt = Checkpoint(src)
    rows = ckpt.meta(next(k for k in ckpt.keys if k.endswith("embed_tokens.weight")))[0][0]
    ckpt.close()
    ids = probe_batch(tok, rows, [], length=64)
    with torch.no_grad():
        want = model_logits(src, "CAUSAL_LM", ids)
    result = llamacpp.check_file(path, kind, tok, SAMPLE_LINES, ids, want)
    print(f"lorakit merge: in llama.cpp: {result['identical']}/{result['lines']} sample lines tokenize as the HF "
          f"tokenizer; on {ids.numel()} probe positions logit correlation {result['logit_correlation']:.4f}, top "
          f"token as the merged model's {result['top1_agreement']:.1%}, KL {result['kl']:.3g}")
    return result


def write_gguf(src: Path, dst_dir: Path, kind: str, name: str | None = None, filename: str | None = None):
    """Write `dst_dir/model-<kind>.gguf` (or `filename`) from the merged directory `src`, tensors streamed; return
    (path, [(key, GGML type)], tensor name map) for `check_gguf`."""
    ckpt = Checkpoint(src)
    cfg = ckpt.config
    arch, permute = ARCHES.get(cfg.get("model_type"), (None, False))
    if arch is None:
        raise LorakitError(f"{src}/config.json: model_type '{cfg.get('model_type')}'; GGUF export supports "
                           f"{sorted(ARCHES)}")
    n_layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), n_layers)
    path = Path(dst_dir) / (filename or f"model-{kind}.gguf")
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])
    writer.add_name(name or Path(src).name)
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    if head_dim != cfg["hidden_size"] // heads:  # llama.cpp assumes hidden/heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    extra = add_rope(writer, cfg, head_dim, Path(src) / "config.json")
    rows = ckpt.meta(next(k for k in ckpt.keys if k.endswith("embed_tokens.weight")))[0][0]
    writer.add_vocab_size(rows)
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[kind])
    add_tokenizer(writer, Path(src), rows)

    plan = []
    for key in ckpt.keys:
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise LorakitError(f"{src}: weight {key} has no GGUF name for {arch.lower()}")
        shape, _ = ckpt.meta(key)
        qtype = _qtype(kind, shape)
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype) if qtype not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else shape
        item = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16 if qtype == \
            gguf.GGMLQuantizationType.F16 else np.uint8
        nbytes = int(np.prod(byte_shape)) * np.dtype(item).itemsize
        writer.add_tensor_info(gname, byte_shape, np.dtype(item), nbytes,
                               raw_dtype=None if item is not np.uint8 else qtype)
        plan.append((key, qtype))
    for gname, t in extra.items():
        writer.add_tensor_info(gname, list(t.shape), np.dtype(np.float32), t.numel() * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key, qtype in tqdm(plan, desc=f"gguf {kind}"):
        t = ckpt.get(key)
        if permute and key.endswith("q_proj.weight"):
            t = rope_permute(t, heads)
        elif permute and key.endswith("k_proj.weight"):
            t = rope_permute(t, kv_heads)
        writer.write_tensor_data(_convert(t, qtype))
    for t in extra.values():
        writer.write_tensor_data(t.float().numpy())
    writer.close()
    ckpt.close()
    return path, plan, names


def gguf_rope(reader, model) -> None:
    """Give a model loaded by transformers' GGUF reader (plain RoPE) the RoPE the file's metadata tells llama.cpp."""
    arch = gguf_field(reader, "general.architecture")
    dim = gguf_field(reader, f"{arch}.rope.dimension_count")
    theta = gguf_field(reader, f"{arch}.rope.freq_base") or 10000.0
    inv, attn = default_inv_freq(float(theta), int(dim)), 1.0
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        inv = inv / torch.from_numpy(np.array(freqs.data, dtype=np.float32)).reshape(-1)
    kind, factor = gguf_field(reader, f"{arch}.rope.scaling.type"), gguf_field(reader, f"{arch}.rope.scaling.factor")
    if kind == "linear":
        inv = inv / float(factor)
    elif kind == "yarn":
        orig = gguf_field(reader, f"{arch}.rope.scaling.original_context_length")
        conf = LlamaConfig(hidden_size=model.config.hidden_size, num_attention_heads=model.config.num_attention_heads,
                           head_dim=int(dim), max_position_embeddings=model.config.max_position_embeddings,
                           rope_parameters={"rope_type": "yarn", "rope_theta": float(theta), "factor": float(factor),
                                            "original_max_position_embeddings": int(orig)})
        inv, attn = ROPE_INIT_FUNCTIONS["yarn"](conf, "cpu")
    elif kind not in (None, "none"):
        raise LorakitError(f"GGUF rope.scaling.type '{kind}' is not checked by lorakit")
    rotary = model.model.rotary_emb
    rotary.inv_freq = inv.float()
    rotary.original_inv_freq = inv.float()
    rotary.attention_scaling = float(attn)


def check_gguf(path: Path, src: Path, plan, names) -> dict:
    """Read the file back with `gguf` (names, shapes, types), tokenize sample lines from its own tokenizer metadata,
    then run it through transformers' GGUF loader given the file's RoPE: logits against the merged model, and against
    the model's own RoPE at up to LONG_PROBE positions."""
    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    ckpt = Checkpoint(src)
    for key, qtype in plan:
        t = found.get(names.get_name(key, try_suffixes=(".weight", ".bias")))
        if t is None or list(reversed([int(x) for x in t.shape])) != ckpt.meta(key)[0] or t.tensor_type != qtype:
            raise LorakitError(f"{path}: tensor for {key} missing or wrong after writing")
    tokens = check_tokenization(reader, src, SAMPLE_LINES)
    print(f"lorakit merge: GGUF tokenizer metadata: {tokens['identical']}/{tokens['lines']} sample lines tokenize "
          f"as the HF tokenizer{' (' + tokens['note'] + ')' if 'note' in tokens else ''}")
    size = path.stat().st_size
    if size > CHECK_LOGITS_MAX_BYTES:
        print(f"lorakit merge: GGUF read back ({len(found)} tensors); logits check skipped above "
              f"{CHECK_LOGITS_MAX_BYTES / 1e9:.0f} GB")
        return {"tokenization": tokens}
    rows = ckpt.meta(next(k for k, _ in plan if k.endswith("embed_tokens.weight")))[0][0]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    gguf_rope(reader, model)
    # the weights, at the probe's 32 positions, against the merged model (tolerance of the file's precision)
    ids = probe_batch(None, rows, [])
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
    want = model_logits(src, "CAUSAL_LM", ids)
    diff, scale = float((got - want).abs().max()), max(1.0, float(want.abs().max()))
    tol = (0.1 if gguf_field(reader, "general.file_type") == 7 else 0.03) * scale  # 7: q8_0
    print(f"lorakit merge: GGUF logits vs merged model: max diff {diff:.3g} (tolerance {tol:.3g})")
    if not diff <= tol:
        raise LorakitError(f"{path.name}: logits differ from the merged model by {diff:.3g} > {tol:.3g}; not written")
    # the RoPE the file's metadata gives llama.cpp, at up to LONG_PROBE positions, against the source config's RoPE on
    # the same (dequantized) weights: any difference is metadata, so the tolerance is fp32 arithmetic's
    length = min(LONG_PROBE, int(ckpt.config.get("max_position_embeddings") or LONG_PROBE))
    ids = probe_batch(None, rows, [], length=length)[1:]
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
        model.model.rotary_emb = type(model.model.rotary_emb)(config=AutoConfig.from_pretrained(src))
        want = model(input_ids=ids).logits.float()
    long_diff, tol = float((got - want).abs().max()), 1e-3 * max(1.0, float(want.abs().max()))
    print(f"lorakit merge: GGUF RoPE vs the model's over {length} positions: max logit diff {long_diff:.3g} "
          f"(tolerance {tol:.3g})")
    if not long_diff <= tol:
        raise LorakitError(f"{path.name}: the file's RoPE metadata moves logits by {long_diff:.3g} > {tol:.3g} over "
                           f"{length} positions (RoPE scaling lost?); not written")
    return {"tokenization": tokens, "max_logit_diff": diff, "positions": length, "rope_logit_diff": long_diff}
