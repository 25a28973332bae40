"""Rewards for RL stages: a user's `package.module:function`, a lorakit reward model (`lorakit rm` adapter + score
head), and verifiable rewards for the bundled Chinese tasks (sentiment label, segmentation F1, format, Han share).

Every reward is a callable (prompts, responses, references, messages) -> list[float]; `parse_weights` reads a recipe's
`rewards` spec ("sentiment:1,format:0.2") into {name: weight}.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Callable, Optional

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from lora_kit.errors import LorakitError
from lora_kit.evaluate.scores import normalise as answer_text  # compared as `lorakit eval` compares answers
from lora_kit.evaluate.scores import segmentation_prf
from lora_kit.models.builder import load_base
from lora_kit.models.load import check_adapter_files
from lora_kit.templates import encode

SENTIMENT_LABELS = ("正面", "负面")  # the bundled task's answers (data/zh_tasks.py)
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def load_reward_fn(spec: str) -> Callable:
    """`package.module:function` called as fn(prompts: list[str], responses: list[str]) -> list[float]."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise LorakitError(f"reward_fn '{spec}' must look like package.module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise LorakitError(f"reward_fn '{spec}': cannot import ({e})") from None
    if not callable(fn):
        raise LorakitError(f"reward_fn '{spec}' is not callable")
    return fn


# ---------------------------------------------------------------------------------------------------- verifiable
def sentiment(prompts, responses, references=None, messages=None) -> list[float]:
    """1 if the answer is the reference label (正面/负面), else 0."""
    return [float(answer_text(t) == answer_text(r)) for t, r in zip(responses, _need(references, "sentiment"))]


def segment_f1(prompts, responses, references=None, messages=None) -> list[float]:
    """Word-segmentation F1 of the answer against the reference (SIGHAN: words compared as character spans)."""
    return [segmentation_prf([answer_text(t)], [r])["f1"] for t, r in zip(responses, _need(references, "segment_f1"))]


def answer_format(prompts, responses, references=None, messages=None) -> list[float]:
    """1 if the answer has the reference's shape: one of the labels for a label reference, otherwise the same
    characters as the reference once spaces are removed (a segmentation that keeps the sentence)."""
    out = []
    for t, r in zip(responses, _need(references, "format")):
        t, r = answer_text(t), answer_text(r)
        out.append(float(t in SENTIMENT_LABELS if r in SENTIMENT_LABELS else "".join(t.split()) == "".join(r.split())))
    return out


def han_share(prompts, responses, references=None, messages=None) -> list[float]:
    """Share of Han characters among the answer's non-space characters (0 for an empty answer)."""
    out = []
    for t in responses:
        chars = [c for c in t if not c.isspace()]
        out.append(sum(bool(_HAN.match(c)) for c in chars) / len(chars) if chars else 0.0)
    return out


def _need(references, name: str) -> list[str]:
    if references is None or any(r is None for r in references):
        raise LorakitError(f"reward '{name}' needs a reference answer per prompt: give data with answers "
                           "(alpaca output, or a conversation ending in an assistant turn)")
    return references


answer_format.__name__ = "format"
BUILTIN = {f.__name__: f for f in (sentiment, segment_f1, answer_format, han_share)}


# ---------------------------------------------------------------------------------------------------- reward model
class RewardModel:
    """A `lorakit rm` output scoring (prompt, response) as the reward model was trained: the conversation ending in the
    answer, rendered with the same template, pooled at the last token."""

    __name__ = "model"

    def __init__(self, adapter_dir: str, base: str, tokenizer, template, cfg):
        path = Path(adapter_dir)
        if not (path / "adapter_config.json").is_file():
            raise LorakitError(f"{path}: reward_adapter must be the output_dir of `lorakit rm` (adapter_config.json)")
        check_adapter_files(path)
        model = load_base(cfg, base, tokenizer, AutoModelForSequenceClassification, num_labels=1,
                          pad_token_id=tokenizer.pad_token_id)
        self.model = PeftModel.from_pretrained(model, str(path)).eval().requires_grad_(False)
        self.tokenizer, self.template = tokenizer, template

    @torch.no_grad()
    def __call__(self, prompts, responses, references=None, messages=None) -> list[float]:
        seqs = [encode(self.tokenizer, self.template, m + [{"role": "assistant", "content": t}])[0]
                for m, t in zip(messages, responses)]
        width, pad = max(len(s) for s in seqs), self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        dev = next(self.model.parameters()).device
        return self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, 0].float().tolist()


def parse_weights(spec: str, extra: tuple[str, ...] = ()) -> dict[str, float]:
    """{name: weight} from "name:weight,..." (a bare name weighs 1); `extra` names the non-built-in rewards the run
    has (fn, model). Unknown names are an error naming the known ones."""
    known = [*BUILTIN, *extra]
    weights: dict[str, float] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, value = item.partition(":")
        name = name.strip()
        if name not in known:
            raise LorakitError(f"rewards: unknown reward '{name}' (known: {', '.join(known)}; fn needs reward_fn=, "
                               "model needs reward_adapter=)")
        try:
            weights[name] = float(value) if value.strip() else 1.0
        except ValueError:
            raise LorakitError(f"rewards: weight of '{name}' must be a number, got {value!r}") from None
    return weights


def reward_callables(weights: dict[str, float], reward_fn: Optional[Callable], reward_model: Optional[RewardModel]):
    """[(name, callable(prompts, responses, references, messages) -> floats)] for every weighted reward, plus
    han_share (weight 0 unless given) so the share of Chinese in the answers is always logged."""
    user = {"fn": (lambda p, r, refs=None, msgs=None: [float(v) for v in reward_fn(p, r)]) if reward_fn else None,
            "model": reward_model}
    out = []
    for name in [*weights, *([] if "han_share" in weights else ["han_share"])]:
        fn = user.get(name) or BUILTIN[name]
        out.append((name, fn))
    return out
