"""Held-out pairwise preference accuracy of a policy: how often an implicit reward ranks the chosen answer above the
rejected one, for every preference loss (reference log-ratio for DPO/IPO/KTO, mean log-probability for ORPO/SimPO).
"""
from __future__ import annotations

import contextlib

import torch


@torch.no_grad()
def answer_logps(model, tokenizer, prompt: str, answer: str) -> tuple[float, int]:
    """(sum of the answer tokens' log-probabilities, number of answer tokens) after `prompt`."""
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    a = tokenizer(answer, add_special_tokens=False).input_ids
    dev = next(model.parameters()).device
    ids = torch.tensor([p + a], device=dev)
    logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(p):, None]).squeeze(-1)
    return logp.sum().item(), len(a)


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, rows: list[dict]) -> dict:
    """On {prompt, chosen, rejected} text rows, with `model` a PeftModel (the reference = its adapter disabled):
    ratio_accuracy (sum log π/π_ref, DPO's implicit reward), mean_logp_accuracy (mean log π per token, SimPO's and
    ORPO's), and the mean margins of both."""
    was_training = model.training
    model.eval()
    ratio_hits, logp_hits, ratio_margin, logp_margin = 0, 0, 0.0, 0.0
    for r in rows:
        scores = {}
        for key in ("chosen", "rejected"):
            lp, n = answer_logps(model, tokenizer, r["prompt"], r[key])
            with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
                ref, _ = answer_logps(model, tokenizer, r["prompt"], r[key])
            scores[key] = (lp - ref, lp / max(n, 1))
        dr = scores["chosen"][0] - scores["rejected"][0]
        dl = scores["chosen"][1] - scores["rejected"][1]
        ratio_hits, logp_hits = ratio_hits + (dr > 0), logp_hits + (dl > 0)
        ratio_margin, logp_margin = ratio_margin + dr, logp_margin + dl
    model.train(was_training)
    n = max(len(rows), 1)
    return {"pairs": len(rows), "ratio_accuracy": ratio_hits / n, "mean_logp_accuracy": logp_hits / n,
            "ratio_margin": ratio_margin / n, "mean_logp_margin": logp_margin / n}
