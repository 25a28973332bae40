"""llama.cpp's own half of GGUF export, through the optional `llama-cpp-python` package (`pip install
'lorakit[gguf]'`): its quantizer for the k-quants people deploy (Q4_K_M, Q5_K_M, Q6_K), and a check of the written file
in llama.cpp itself: it must tokenize sample text into the HF tokenizer's ids and predict what the merged model
predicts. lorakit never re-implements the k-quant formats; without the package those types are refused in one line.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from lora_kit.errors import LorakitError

KQUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
           "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
# The mean correlation of llama.cpp's logits with the merged model's, per probe position, that a file must keep. A
# wrong tensor layout, RoPE or vocabulary gives ~0; rounding or quantizing weights only adds noise. Measured on a
# random 256-wide tiny LLaMA, which quantizes worse than a trained model (Gaussian weights, near-flat logits): f16
# 1.0000, q8_0 0.9988, q6_k 0.9894, q5_k_m 0.9646, q4_k_m 0.8767. How much a type costs a real model is measured
# as bits per character in BENCHMARKS.md, not here.
MIN_CORR = {"f32": 0.999, "f16": 0.999, "bf16": 0.995, "q8_0": 0.99, "q6_k": 0.95, "q5_k_m": 0.9, "q4_k_m": 0.8}


def available() -> bool:
    """Whether llama-cpp-python is installed (found without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def require(what: str):
    """The `llama_cpp` module, or one line saying how to get it."""
    if not available():
        raise LorakitError(f"{what} needs llama.cpp: pip install 'lorakit[gguf]' (the llama-cpp-python package; it "
                           "compiles llama.cpp, ~10 minutes on 2 cores)")
    import llama_cpp  # optional dependency: imported only when used

    return llama_cpp


def quantize(src: Path, dst: Path, kind: str) -> None:
    """Quantize the f16/f32 GGUF `src` to the k-quant `kind` at `dst` with llama.cpp's own quantizer."""
    llama_cpp = require(f"--gguf-type {kind}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, KQUANTS[kind])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise LorakitError(f"{src.name}: llama.cpp's quantizer failed for {kind} (code {rc}); not written")


def load(path: Path, n_ctx: int = 512):
    """The GGUF in llama.cpp, every position's logits kept."""
    llama_cpp = require("checking a GGUF in llama.cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                           n_threads=os.cpu_count() or 1, seed=0)


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's ids for `text` as a document's body: no BOS, special-token text kept as text."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def logits(llm, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits at every position of `ids` (fed as they are, no BOS added)."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


def check_file(path: Path, kind: str, hf_tokenizer, lines: list[str], ids: torch.Tensor, want: torch.Tensor) -> dict:
    """Run the written file in llama.cpp: each of `lines` must tokenize to the HF tokenizer's ids, and its logits on
    the probe `ids` ([batch, length]) must correlate with the merged model's (`want`) by MIN_CORR[kind] on average.
    Raises naming the first difference; returns the figures (with top-1 agreement and KL divergence)."""
    llm = load(path, n_ctx=max(512, ids.shape[1] + 8))
    try:
        differ = [(line, hf_tokenizer(line, add_special_tokens=False)["input_ids"], tokenize(llm, line))
                  for line in lines]
        differ = [d for d in differ if d[1] != d[2]]
        if differ:
            line, hf, got = differ[0]
            raise LorakitError(f"{path.name}: llama.cpp tokenizes {len(differ)}/{len(lines)} sample lines differently "
                               f"from the HF tokenizer, e.g. {line!r}: {got[:12]} vs {hf[:12]}; not written")
        got = torch.stack([logits(llm, row.tolist()) for row in ids])
    finally:
        llm.close()
    g, w = got - got.mean(-1, keepdim=True), want - want.mean(-1, keepdim=True)
    corr = float(((g * w).sum(-1) / (g.norm(dim=-1) * w.norm(dim=-1)).clamp_min(1e-12)).mean())
    logp, logq = want.log_softmax(-1), got.log_softmax(-1)
    result = {"lines": len(lines), "identical": len(lines), "logit_correlation": round(corr, 6),
              "top1_agreement": round(float((got.argmax(-1) == want.argmax(-1)).float().mean()), 4),
              "kl": round(float((logp.exp() * (logp - logq)).sum(-1).mean()), 6),
              "max_logit_diff": round(float((got - want).abs().max()), 4)}
    if not corr >= MIN_CORR[kind]:
        raise LorakitError(f"{path.name}: in llama.cpp its logits correlate with the merged model's by {corr:.4f} on "
                           f"the probe (a {kind} file keeps at least {MIN_CORR[kind]}); not written")
    return result
