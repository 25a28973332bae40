"""Bits per character: how well a model predicts whole documents, comparable across tokenizers (a base and a
vocab-extended model score the same text, whatever number of tokens each needs).

bits/char = total negative log-likelihood of the documents' tokens (nats) / ln 2 / number of characters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DocScore:
    """Summed negative log-likelihood of scored documents with their token and character counts."""
    nats: float = 0.0  # summed negative log-likelihood of every document token
    tokens: int = 0  # tokens scored
    chars: int = 0  # characters (Unicode code points) of the documents

    @property
    def bits_per_char(self) -> float:
        return self.nats / math.log(2) / self.chars if self.chars else float("nan")

    @property
    def loss(self) -> float:
        """Mean loss per token (nats): the held-out loss, in the units of the training loss."""
        return self.nats / self.tokens if self.tokens else float("nan")


def _windows(ids: list[int], start: int, block_size: int) -> list[tuple[list[int], int]]:
    """(inputs, number scored) windows covering a document: each window is the previous token followed by up to
    block_size-1 document tokens, so every token is predicted exactly once. The first window starts from `start`."""
    out, prev, step = [], start, block_size - 1
    for i in range(0, len(ids), step):
        chunk = ids[i:i + step]
        out.append(([prev] + chunk, len(chunk)))
        prev = chunk[-1]
    return out


@torch.inference_mode()
def score_documents(model, tokenizer, texts: list[str], block_size: int = 512, batch_size: int = 8) -> DocScore:
    """Score each document given only a document-start token (EOS, the separator pretraining puts between documents).
    Documents longer than a block are scored in consecutive windows."""
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    score = DocScore(chars=sum(len(t) for t in texts))
    windows = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []:
        windows += _windows(ids, start, max(block_size, 2))
    windows.sort(key=lambda w: -len(w[0]))  # similar lengths together: little padding
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for b in range(0, len(windows), batch_size):
            batch = windows[b:b + batch_size]
            width = max(len(w[0]) for w in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, (inp, _) in enumerate(batch):
                ids[i, :len(inp)] = torch.tensor(inp)
                mask[i, :len(inp)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scored = mask[:, 1:].to(device).bool()  # padding never reaches the (fp32) softmax
            nll = torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), ids[:, 1:].to(device)[scored],
                                                    reduction="none")
            score.nats += float(nll.double().sum())
            score.tokens += int(scored.sum())
    finally:
        model.train(was_training)
    return score


def bits_per_char(model, tokenizer, texts: list[str], block_size: int = 512, batch_size: int = 8) -> float:
    """Held-out bits per character of `texts` (whole documents), comparable across tokenizers."""
    return score_documents(model, tokenizer, texts, block_size, batch_size).bits_per_char
