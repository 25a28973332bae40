"""`lorakit chat`: one answer (`--prompt`) or an interactive loop, streaming tokens, with the training template."""
from __future__ import annotations

import argparse
import sys

import torch
from transformers import TextStreamer

from lora_kit.models.builder import load_for_inference
from lora_kit.templates import prompt_ids, resolve, without_partial_char


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `lorakit chat`: model or adapter, one-shot prompt or system message, sampling."""
    p.add_argument("--model", help="base model (alias, dir, hub id); default: the adapter's base")
    p.add_argument("--adapter", help="LoRA adapter directory written by a lorakit stage")
    p.add_argument("--prompt", help="answer this once and exit (otherwise: interactive, empty line or Ctrl-D quits)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--template", help="override the prompt template (default: the adapter's training template)")


class _Streamer(TextStreamer):
    """transformers' stdout streamer, ending without a partial character as the returned answer does."""

    def on_finalized_text(self, text: str, stream_end: bool = False):
        super().on_finalized_text(without_partial_char(text) if stream_end else text, stream_end)


def reply(model, tokenizer, template, messages: list[dict], args, stream: bool = True) -> str:
    """The assistant's answer to `messages` (greedy unless temperature > 0), streamed to stdout if `stream`."""
    ids = torch.tensor([prompt_ids(tokenizer, template, messages)], device=next(model.parameters()).device)
    streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    sample = args.temperature > 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=sample, temperature=args.temperature if sample else None,
                             top_p=args.top_p if sample else None, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return without_partial_char(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def main(args) -> int:
    """`lorakit chat`: answer --prompt once, or hold a conversation on stdin until an empty line or EOF."""
    model, tokenizer, template_name = load_for_inference(args.model, args.adapter, dtype=args.dtype)
    template = resolve(args.template or template_name, tokenizer)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        reply(model, tokenizer, template, history + [{"role": "user", "content": args.prompt}], args)
        return 0
    print("lorakit chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": reply(model, tokenizer, template, history, args)})
    return 0
