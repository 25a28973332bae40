"""GGUF export of a merged LLaMA-family directory through the `gguf` package: tensors streamed one at a time (f32, f16,
bf16 or q8_0), tokenizer included with its extended vocabulary, read back and (for small models) logits checked.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_kit.errors import LorakitError
from lora_kit.export.common import Checkpoint
from lora_kit.export.verify import model_logits, probe_batch

ARCHES = {"llama": "LLAMA", "mistral": "LLAMA"}  # model_type -> gguf.MODEL_ARCH member (same tensor layout)
CHECK_LOGITS_MAX_BYTES = 2 * 10**9  # the transformers GGUF loader holds the whole model dequantized in fp32
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


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


def add_tokenizer(writer, src: Path, rows: int) -> None:
    """Vocabulary as llama.cpp expects it: byte-level BPE ('gpt2': tokens + merges) or SentencePiece ('llama')."""
    tok = AutoTokenizer.from_pretrained(src)
    if len(tok) > rows:
        raise LorakitError(f"{src}: tokenizer has {len(tok)} tokens, the model {rows} embedding rows")
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    tokens, types, scores = [], [], []
    if (src / "tokenizer.model").is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            types.append(TOKEN_CONTROL if sp.is_control(i) else TOKEN_UNKNOWN if sp.is_unknown(i) else
                         TOKEN_BYTE if sp.is_byte(i) else TOKEN_UNUSED if sp.is_unused(i) else TOKEN_NORMAL)
        model = "llama"
    else:
        spec = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        if spec["model"]["type"] != "BPE":
            raise LorakitError(f"{src}/tokenizer.json: model type {spec['model']['type']}; GGUF export supports "
                               "byte-level BPE or SentencePiece (tokenizer.model)")
        by_id = {i: t for t, i in spec["model"]["vocab"].items()}
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)]
        types = [TOKEN_NORMAL if i in by_id else TOKEN_UNUSED for i in range(len(tokens))]
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        writer.add_token_merges(merges)
        pre = spec.get("pre_tokenizer") or {}
        byte_regex = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
        writer.add_tokenizer_pre("gpt-2" if byte_regex else "default")
        model = "gpt2"
    for i in range(len(tokens), rows):  # added tokens (the extended vocabulary), then padding rows
        tokens.append(added[i].content if i in added else f"[PAD{i}]")
        types.append((TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED) if i in added else TOKEN_UNUSED)
        scores.append(0.0)
    for i, t in added.items():  # added tokens that overwrite base ids keep their role
        if i < len(tokens) and t.special:
            types[i] = TOKEN_CONTROL
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model == "llama":
        writer.add_token_scores(scores)
    for name, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id),
                        ("pad", tok.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{name}_token_id")(value)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def export_gguf(src: Path, dst_dir: Path, kind: str = "f16") -> Path:
    """Convert the merged model directory `src` into `dst_dir/model-<kind>.gguf`; verify it; return the path."""
    ckpt = Checkpoint(src)
    cfg = ckpt.config
    arch = ARCHES.get(cfg.get("model_type"))
    if arch is None:
        raise LorakitError(f"{src}/config.json: model_type '{cfg.get('model_type')}'; GGUF export supports "
                           f"{sorted(ARCHES)}")
    n_layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), n_layers)
    path = Path(dst_dir) / f"model-{kind}.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])
    writer.add_name(Path(src).name)
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    rope = cfg.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0))
    rows = ckpt.meta(next(k for k in ckpt.keys if k.endswith("embed_tokens.weight")))[0][0]
    writer.add_vocab_size(rows)
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[kind])
    add_tokenizer(writer, Path(src), rows)

    plan = []
    for key in ckpt.keys:
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LorakitError(f"{src}: weight {key} has no GGUF name for {arch.lower()}")
        shape, _ = ckpt.meta(key)
        qtype = _qtype(kind, shape)
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype) if qtype not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else shape
        item = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16 if qtype == \
            gguf.GGMLQuantizationType.F16 else np.uint8
        nbytes = int(np.prod(byte_shape)) * np.dtype(item).itemsize
        writer.add_tensor_info(name, byte_shape, np.dtype(item), nbytes,
                               raw_dtype=None if item is not np.uint8 else qtype)
        plan.append((key, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key, qtype in tqdm(plan, desc=f"gguf {kind}"):
        t = ckpt.get(key)
        if key.endswith("q_proj.weight"):
            t = rope_permute(t, heads)
        elif key.endswith("k_proj.weight"):
            t = rope_permute(t, kv_heads)
        writer.write_tensor_data(_convert(t, qtype))
    writer.close()
    ckpt.close()
    check_gguf(path, src, plan, names)
    return path


def check_gguf(path: Path, src: Path, plan, names) -> None:
    """Read the file back with `gguf` (names, shapes, types), then compare logits with transformers' GGUF loader."""
    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    ckpt = Checkpoint(src)
    for key, qtype in plan:
        t = found.get(names.get_name(key, try_suffixes=(".weight", ".bias")))
        if t is None or list(reversed([int(x) for x in t.shape])) != ckpt.meta(key)[0] or t.tensor_type != qtype:
            raise LorakitError(f"{path}: tensor for {key} missing or wrong after writing")
    size = path.stat().st_size
    if size > CHECK_LOGITS_MAX_BYTES:
        print(f"lorakit merge: GGUF read back ({len(found)} tensors); logits check skipped above "
              f"{CHECK_LOGITS_MAX_BYTES / 1e9:.0f} GB")
        return


    ids = probe_batch(None, ckpt.meta(next(k for k, _ in plan if k.endswith("embed_tokens.weight")))[0][0], [])
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
    want = model_logits(src, "CAUSAL_LM", ids)
    diff, scale = float((got - want).abs().max()), max(1.0, float(want.abs().max()))
    tol = (0.1 if path.name.endswith("q8_0.gguf") else 0.03) * scale
    print(f"lorakit merge: GGUF logits vs merged model: max diff {diff:.3g} (tolerance {tol:.3g})")
    if not diff <= tol:
        raise LorakitError(f"{path.name}: logits differ from the merged model by {diff:.3g} > {tol:.3g}; not written")
