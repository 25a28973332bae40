"""Bits per character: whole documents, every token scored once, padding-independent."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_kit.evaluate.bpc import bits_per_char, score_documents

DOCS = ["今天天气很好，我们去公园散步吧。", "这家酒店的服务非常周到，房间干净整洁，下次还会再来。", "hello 世界", "好"]


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), \
        AutoTokenizer.from_pretrained(tiny_model_dir)


def test_matches_a_direct_computation(model_tok):
    model, tok = model_tok
    nats, chars = 0.0, 0
    for doc in DOCS:
        ids = [tok.eos_token_id] + tok(doc, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        nats -= float(logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).sum())
        chars += len(doc)
    assert bits_per_char(model, tok, DOCS, block_size=512, batch_size=3) == pytest.approx(nats / math.log(2) / chars,
                                                                                          rel=1e-5)


def test_every_token_scored_once_and_padding_changes_nothing(model_tok):
    model, tok = model_tok
    n_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in DOCS)
    one = score_documents(model, tok, DOCS, block_size=512, batch_size=1)
    many = score_documents(model, tok, DOCS, block_size=512, batch_size=4)
    assert one.tokens == many.tokens == n_tokens and one.chars == sum(map(len, DOCS))
    assert many.nats == pytest.approx(one.nats, rel=1e-5)
    windowed = score_documents(model, tok, DOCS, block_size=4, batch_size=4)  # long documents in 3-token windows
    assert windowed.tokens == n_tokens and windowed.nats != pytest.approx(one.nats, rel=1e-6)
    assert one.loss == pytest.approx(one.nats / n_tokens)


def test_restores_training_mode_and_handles_no_documents(model_tok):
    model, tok = model_tok
    model.train()
    score = score_documents(model, tok, [], 8)
    assert model.training and score.tokens == 0 and math.isnan(score.bits_per_char)
    bits_per_char(model, tok, DOCS[:1])
    assert model.training
    model.eval()
