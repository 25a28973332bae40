"""Prompt templates: turn a conversation into text segments marked trainable (assistant) or not.

The tokenizer's own chat template is used first (`template=auto`); otherwise a named template from the registry below,
covering the families the Chinese community fine-tunes. Training, `chat` and `eval` all render through here.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Optional

from lora_kit.errors import LorakitError

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
Segment = tuple[str, bool]  # (text, trained)


@dataclass(frozen=True)
class Template:
    """A prompt format as text patterns per role; `{content}`, `{system}`, `{bos}`, `{eos}` are filled in."""
    name: str
    user: str  # "{content}" is the user turn; includes the assistant prefix, so it is the generation prompt
    assistant: str  # "{content}" then the end-of-turn marker; `{eos}` is the tokenizer's eos token
    system: str = "{content}"
    default_system: str = ""
    first_user: Optional[str] = None  # when the system text lives inside the first user turn (LLaMA-2)
    prefix: str = ""  # once at the start, e.g. "{bos}" or ChatGLM's "[gMASK]sop"


TEMPLATES: dict[str, Template] = {}


def register(t: Template) -> Template:
    """Add a template to TEMPLATES under its name; a name registered twice is a bug."""
    if t.name in TEMPLATES:
        raise ValueError(f"template '{t.name}' registered twice")
    TEMPLATES[t.name] = t
    return t


ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")
register(Template("alpaca", user="### Instruction:\n{content}\n\n### Response:\n", assistant="{content}{eos}\n\n",
                  default_system=ALPACA_SYSTEM, prefix="{bos}"))
# Chinese-Alpaca-2 uses LLaMA-2-chat's format with a bilingual system prompt (ymcui/Chinese-LLaMA-Alpaca-2).
_LLAMA2 = dict(user="{bos}[INST] {content} [/INST]",
               first_user="{bos}[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
               assistant=" {content} {eos}", system="")
register(Template("llama2", **_LLAMA2))
register(Template("chinese-alpaca-2", default_system="You are a helpful assistant. 你是一个乐于助人的助手。",
                  **_LLAMA2))
register(Template("vicuna", user="USER: {content} ASSISTANT:", assistant="{content}{eos}", system="{content} ",
                  default_system="A chat between a curious user and an artificial intelligence assistant. "
                                 "The assistant gives helpful, detailed, and polite answers to the user's questions.",
                  prefix="{bos}"))
_CHATML = dict(system="<|im_start|>system\n{content}<|im_end|>\n",
               user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n", assistant="{content}<|im_end|>\n")
register(Template("chatml", **_CHATML))
register(Template("qwen", default_system="You are a helpful assistant.", **_CHATML))
register(Template("chatglm3", system="<|system|>\n{content}", user="<|user|>\n{content}<|assistant|>",
                  assistant="\n{content}", prefix="[gMASK]sop"))
register(Template("baichuan2", user="<reserved_106>{content}<reserved_107>", assistant="{content}{eos}"))


def resolve(name: str, tokenizer) -> Optional[Template]:
    """The registry template for `name`, or None to use the tokenizer's chat template (`auto` with one present)."""
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            return None
        return TEMPLATES["alpaca"]
    if name == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise LorakitError("template=tokenizer but the tokenizer has no chat template; pick one of "
                               + ", ".join(TEMPLATES))
        return None
    if name not in TEMPLATES:
        hint = difflib.get_close_matches(name, list(TEMPLATES), n=1)
        raise LorakitError(f"unknown template '{name}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
                           + f" (known: auto, tokenizer, {', '.join(TEMPLATES)})")
    return TEMPLATES[name]


def _jinja_expr(fmt: str, content: str = "''", system: str = "''") -> str:
    """A pattern as one Jinja expression: literals (JSON-escaped, which Jinja reads) joined with `~` to the variables
    standing for {content}, {system}, {bos} and {eos}."""
    names = {"{content}": content, "{system}": system, "{bos}": "bos_token", "{eos}": "eos_token"}
    parts = [names.get(p) or json.dumps(p) for p in re.split(r"(\{content\}|\{system\}|\{bos\}|\{eos\})", fmt) if p]
    return " ~ ".join(parts) or "''"


def as_chat_template(t: Template) -> str:
    """`t` as a Jinja chat template rendering exactly the text `segments` gives, for engines that take a chat template
    rather than lorakit's registry (vLLM's `--chat-template`). Generation prompts need nothing more: the user pattern
    already ends with the assistant's prefix."""
    first_user = _jinja_expr(t.first_user, "m['content']", "ns.system") if t.first_user else "''"
    return "".join([
        "{%- set ns = namespace(system=" + json.dumps(t.default_system) + ", first=true, head="
        + _jinja_expr(t.prefix) + ") -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}"
        "{%- endif -%}",
        "{%- if ns.system and " + ("false" if t.first_user else "true") + " -%}{%- set ns.head = ns.head ~ "
        + _jinja_expr(t.system, "ns.system") + " -%}{%- endif -%}",
        "{%- for m in messages -%}",
        "{%- if loop.first and m['role'] == 'system' -%}",
        "{%- elif m['role'] == 'user' -%}",
        "{%- if ns.first and " + ("true" if t.first_user else "false") + " and ns.system -%}{{ ns.head ~ "
        + first_user + " }}{%- else -%}{{ ns.head ~ " + _jinja_expr(t.user, "m['content']", "ns.system")
        + " }}{%- endif -%}{%- set ns.head = '' -%}{%- set ns.first = false -%}",
        "{%- elif m['role'] == 'assistant' -%}{{ " + _jinja_expr(t.assistant, "m['content']") + " }}",
        "{%- else -%}{{ raise_exception('template " + t.name + ": unexpected role ' ~ m['role']) }}",
        "{%- endif -%}{%- endfor -%}",
    ])


def _fill(fmt: str, tokenizer, **kw) -> str:
    return (fmt.replace("{bos}", tokenizer.bos_token or "").replace("{eos}", tokenizer.eos_token or "")
            .replace("{system}", kw.get("system", "")).replace("{content}", kw.get("content", "")))


def _registry_segments(t: Template, tokenizer, messages: list[Message], generation: bool) -> list[Segment]:
    system = t.default_system
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out: list[Segment] = []
    head = _fill(t.prefix, tokenizer)
    if system and not t.first_user:
        head += _fill(t.system, tokenizer, content=system)
    first = True
    for m in messages:
        if m["role"] == "user":
            fmt = t.first_user if (first and t.first_user and system) else t.user
            out.append((head + _fill(fmt, tokenizer, content=m["content"], system=system), False))
            head, first = "", False
        elif m["role"] == "assistant":
            out.append((_fill(t.assistant, tokenizer, content=m["content"]), True))
        else:
            raise LorakitError(f"template '{t.name}': unexpected role '{m['role']}' after the first message")
    return out


def _chat_template_segments(tokenizer, messages: list[Message], generation: bool) -> list[Segment]:
    """Render with the tokenizer's chat template; assistant spans found by rendering growing prefixes."""

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    out: list[Segment] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise LorakitError("the tokenizer's chat template does not render conversations as growing prefixes; "
                               "set template= to a registry name (e.g. chatml, llama2, alpaca)")
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    if generation:
        prompt = render(messages, True)
        if prompt[len(done):]:
            out.append((prompt[len(done):], False))
    return [s for s in out if s[0]]


def segments(tokenizer, template: Optional[Template], messages: list[Message], generation: bool = False):
    """Text segments for a conversation; with `generation` the last message is a user turn awaiting an answer."""
    if template is None:
        return _chat_template_segments(tokenizer, messages, generation)
    return [s for s in _registry_segments(template, tokenizer, messages, generation) if s[0]]


def longest_piece(tokenizer) -> int:
    """The most characters one token can stand for (the longest vocabulary string: a byte-level token's string is at
    least as long as the text it covers), cached on the tokenizer."""
    n = getattr(tokenizer, "_lorakit_longest_piece", None)
    if n is None:
        n = max(map(len, tokenizer.get_vocab()), default=1)
        tokenizer._lorakit_longest_piece = n
    return n


def encode(tokenizer, template: Optional[Template], messages: list[Message], generation: bool = False,
           max_tokens: Optional[int] = None):
    """(input_ids, labels): each segment tokenized on its own; labels are -100 outside assistant segments.

    With `max_tokens` (a cutoff the caller truncates to), text past what that many tokens could cover is never
    tokenized: each segment is cut to (tokens left + 8) x the longest piece's characters. A record that fits is not
    cut at all; a longer one still yields more than `max_tokens` ids (each token covers at most the longest piece), and
    a cut re-splits only the tokens next to it, 8 tokens past the cutoff (tests/test_data.py checks the ids on real
    text). So a 50 MB record costs what a short one does; segments after the cutoff are skipped."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments(tokenizer, template, messages, generation):
        if max_tokens is not None:
            if len(ids) > max_tokens:
                break
            text = text[: (max_tokens - len(ids) + 8) * longest_piece(tokenizer)]
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


def prompt_ids(tokenizer, template: Optional[Template], messages: list[Message]) -> list[int]:
    """Token ids of a generation prompt (the conversation so far, ending in a user turn)."""
    return encode(tokenizer, template, messages, generation=True)[0]


def without_partial_char(text: str) -> str:
    """A finished answer's text without a trailing U+FFFD: generation that stops inside a multi-byte character (a
    byte-level vocabulary spells a Han character with 2-3 tokens) leaves bytes that decode to it. vLLM leaves them
    out; `lorakit chat` and `lorakit serve` do the same, so every back end returns the same text."""
    return text[:-1] if text.endswith("\ufffd") else text
