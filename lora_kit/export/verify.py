"""Export verification: logits of a written model against base + adapters run by PEFT, on a fixed probe batch.

Weights are loaded block by block (one decoder layer at a time) straight from safetensors, so checking a 70B merge needs
about one layer of memory; PEFT runs the (last) adapter unmerged, so the check does not share the merge's arithmetic.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from accelerate import init_empty_weights
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from lora_kit.errors import LorakitError
from lora_kit.export.common import Checkpoint, release_memory

PROBE_TEXT = "今天天气很好，我们去公园散步吧。大语言模型的中文能力来自词表扩充和继续预训练。The quick brown fox, 2024."
# Both sides of the check run in fp32, so the only expected difference is the rounding of the merged weights to the
# output dtype. Its effect is measured, not guessed: every merged weight moved by one unit in the last place of the
# dtype (twice the largest rounding error) in a seeded random direction. FP32_FLOOR covers fp32 arithmetic order: PEFT
# computes x@W + (x@A)@B·s, the merged model x@(W + B@A·s) (measured ~1e-5 × max |logit| on SmolLM2).
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # spacing relative to the value
FP32_FLOOR = 1e-4  # × max(1, max |logit|)


def probe_batch(tokenizer, rows: int, new_ids: list[int], length: int = 32) -> torch.Tensor:
    """Two sequences: Chinese + English text, then the new token ids, the last rows and seeded random ids."""
    text = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"] if tokenizer is not None else []
    text = [i for i in text if i < rows][:length] or [0]
    first = (text * (length // len(text) + 1))[:length]
    g = torch.Generator().manual_seed(0)
    extra = [i for i in new_ids if i < rows][: length // 2] + list(range(max(0, rows - 4), rows))
    second = (extra + torch.randint(0, rows, (length,), generator=g).tolist())[:length]
    return torch.tensor([first, second])


class LazyWeights:
    """Materialise each block's parameters from the checkpoint just before it runs and drop them right after."""

    def __init__(self, model, ckpt: Checkpoint, transform=None, dtype=torch.float32):
        self.ckpt, self.transform, self.dtype = ckpt, transform, dtype
        key_of_param: dict[int, str] = {}
        owners = []
        for mname, module in model.named_modules(remove_duplicate=False):
            for pname, p in module.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if full in ckpt:
                    key_of_param[id(p)] = full
                owners.append((mname, module, pname, p))
        # tied weights (lm_head -> embed_tokens) have no key of their own: found through the shared Parameter or,
        # when the empty model was not tied, through the model's tied-weights table
        tied = getattr(model, "_tied_weights_keys", None)
        tied = tied if isinstance(tied, dict) and getattr(model.config, "tie_word_embeddings", False) else {}

        def key_for(name, p):
            key = key_of_param.get(id(p))
            return key if key is not None else (tied.get(name) if tied.get(name) in ckpt else None)

        self.slots = [(m, module, pn, key_for(f"{m}.{pn}" if m else pn, p), tuple(p.shape))
                      for m, module, pn, p in owners]
        layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=None)
        layer_paths = {n for n, m in model.named_modules() if layers is not None and any(m is l for l in layers)}
        blocks = set(layer_paths)
        for mname, *_ in self.slots:
            if not any(mname == b or mname.startswith(b + ".") for b in layer_paths):
                blocks.add(mname)
        self.blocks = sorted(blocks)
        # PEFT places adapter weights on the device of the base weight, so a meta base would leave them on meta:
        # stand in a zero-stride CPU placeholder (one element of memory) until a block runs.
        self._drop(self.slots)

    def attach(self, model) -> None:
        """Hook the module now found at each block path (PEFT may have wrapped the original one)."""
        for path in self.blocks:
            slots = [s for s in self.slots if s[0] == path or s[0].startswith(path + ".")]
            target = model.get_submodule(path)
            target.register_forward_pre_hook(lambda mod, args, slots=slots: self._load(slots))
            target.register_forward_hook(lambda mod, args, out, slots=slots: self._drop(slots, trim=True))

    def _load(self, slots):
        for _, module, pname, key, shape in slots:
            if key is not None:
                w = self.ckpt.get(key)
                w = self.transform(key, w.float()) if self.transform else w
                module._parameters[pname] = torch.nn.Parameter(w.to(self.dtype), requires_grad=False)
        self.ckpt.close()

    def _drop(self, slots, trim=False):
        for _, module, pname, key, shape in slots:
            # NaN where no checkpoint tensor backs the weight: if such a weight is ever used, the check fails
            fill = 0.0 if key is not None else float("nan")
            placeholder = torch.full((), fill, dtype=self.dtype).expand(shape)
            module._parameters[pname] = torch.nn.Parameter(placeholder, requires_grad=False)
        if trim:
            release_memory()


def _empty_model(config, model_class, dtype=torch.float32):
    with init_empty_weights(include_buffers=False):  # buffers (rotary inv_freq) are computed, not stored
        model = model_class.from_config(config, dtype=dtype)
    return model.eval()


def _config(path: Path, task_type: str, pad_token_id: Optional[int]):
    config = AutoConfig.from_pretrained(path)
    if task_type == "SEQ_CLS":
        config.num_labels = 1
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad_token_id if pad_token_id is not None else 0
    config.use_cache = False
    return config


def model_class_for(task_type: str):
    """The transformers Auto class that loads a model of this PEFT task type (SEQ_CLS or causal LM)."""
    return AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM


@torch.no_grad()
def reference_logits(base: Path, adapters: list[Path], task_type: str, ids: torch.Tensor, pad_id=None, earlier=(),
                     dtype=torch.float32):
    """(logits of base + adapters, logits without the last adapter), the last adapter run by PEFT over block-loaded
    base weights. Earlier adapters of a chain (`earlier`, read with `read_adapter`) are folded into the loaded weights:
    PEFT cannot stack adapters whose token rows or saved modules differ (a KeyError in `load_adapter`)."""
    ckpt = Checkpoint(base)
    model = _empty_model(_config(base, task_type, pad_id), model_class_for(task_type), dtype)

    def fold(key, w):
        for a in earlier:
            w = a.apply(key, w)
        return w

    lazy = LazyWeights(model, ckpt, fold if earlier else None, dtype)
    peft_model = PeftModel.from_pretrained(model, str(adapters[-1]), low_cpu_mem_usage=True)
    lazy.attach(peft_model.base_model.model)
    ref = peft_model(input_ids=ids).logits.float()
    with peft_model.disable_adapter():
        bare = peft_model(input_ids=ids).logits.float()
    return ref, bare


@torch.no_grad()
def model_logits(path: Path, task_type: str, ids: torch.Tensor, pad_id=None, dtype=torch.float32,
                 transform=None) -> torch.Tensor:
    """Logits of the model directory `path`, block-loaded, computed in `dtype` (weights passed through `transform`)."""
    ckpt = Checkpoint(path)
    model = _empty_model(_config(path, task_type, pad_id), model_class_for(task_type), dtype)
    LazyWeights(model, ckpt, transform, dtype=dtype).attach(model)
    return model(input_ids=ids).logits.float()


def ulp_step(dtype: torch.dtype, seed: int = 0):
    """A LazyWeights transform moving every floating weight one ulp of `dtype` up or down (seeded per weight)."""

    def step(key: str, w: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + sum(key.encode()))
        sign = torch.randint(0, 2, w.shape, generator=g, dtype=torch.int8).float().mul_(2).sub_(1)
        return w.mul(1 + sign * ULP[dtype]).to(dtype).float()

    return step


def compare(ref: torch.Tensor, bare: torch.Tensor, out: torch.Tensor, dtype: torch.dtype,
            stepped: Optional[torch.Tensor] = None) -> dict:
    """Max |merged − reference| (both fp32 compute) against the measured effect of one ulp of `dtype` on the
    merged weights (`stepped`: the merged model's logits so perturbed; None for fp32), and the adapters' effect."""
    if ref.shape != out.shape:
        raise LorakitError(f"merged model's logits have shape {tuple(out.shape)}, base + adapters {tuple(ref.shape)}")
    diff = float((out - ref).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    rounding = float((stepped - out).abs().max()) if stepped is not None else 0.0
    tol = max(FP32_FLOOR * scale, rounding)
    return {"max_abs_diff": diff, "tolerance": tol, "dtype": str(dtype)[6:], "ulp_effect": rounding,
            "adapter_effect": float((ref - bare).abs().max()),
            "ok": diff <= tol and bool(torch.isfinite(out).all() and torch.isfinite(ref).all())}
