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


def _go_operands(fmt: str, tokenizer, content: str = '""', system: str = '""') -> list[str]:
    """A pattern as Go template operands: string literals (JSON's escapes are Go's) and the variables standing for
    {content}, {system} and {bos} (`$bos`); {eos} becomes the tokenizer's token text, which Ollama reads back as it."""
    names = {"{content}": content, "{system}": system, "{bos}": "$bos"}
    out = []
    for p in re.split(r"(\{content\}|\{system\}|\{bos\}|\{eos\})", fmt):
        text = {"{eos}": tokenizer.eos_token or ""}.get(p, p)
        if p in names:
            out.append(names[p])
        elif text:
            out.append(json.dumps(text, ensure_ascii=False))
    return out


def _go_print(operands: list[str]) -> str:
    return "(print " + " ".join(operands) + ")" if operands else '""'


def as_go_template(t: Template, tokenizer, skip_leading_bos: bool = False) -> str:
    """`t` as an Ollama TEMPLATE (Go text/template over `.System` and `.Messages`) rendering exactly the text
    `segments(..., generation=True)` gives; a Modelfile's SYSTEM supplies the default system text. With
    `skip_leading_bos` the first turn's {bos} is left to the runtime, which adds it itself (llama.cpp with add_bos):
    `$bos` is empty until the first user turn is written."""
    bos = json.dumps(tokenizer.bos_token or "", ensure_ascii=False)
    user = _go_print(_go_operands(t.user, tokenizer, ".Content", "$system"))
    first = _go_print(_go_operands(t.first_user, tokenizer, ".Content", "$system")) if t.first_user else '""'
    return "".join([
        "{{- $system := .System }}{{- $first := true }}{{- $bos := " + ('""' if skip_leading_bos else bos) + " }}",
        "{{- $head := " + _go_print(_go_operands(t.prefix, tokenizer)) + " }}",
        "{{- if and $system " + ("false" if t.first_user else "true") + " }}{{- $head = print $head "
        + _go_print(_go_operands(t.system, tokenizer, "$system")) + " }}{{- end }}",
        "{{- range .Messages }}",
        "{{- if eq .Role \"user\" }}",
        "{{- if and $first " + ("true" if t.first_user else "false") + " $system }}{{ print $head " + first
        + " }}{{- else }}{{ print $head " + user + " }}{{- end }}{{- $head = \"\" }}{{- $first = false }}{{- $bos = "
        + bos + " }}",
        "{{- else if eq .Role \"assistant\" }}{{ " + _go_print(_go_operands(t.assistant, tokenizer, ".Content"))
        + " }}",
        "{{- end }}{{- end }}",
    ])


def stop_strings(t: Template, tokenizer) -> list[str]:
    """Where an answer in `t` ends: the text after the assistant's {content} (its end-of-turn marker or EOS), the
    tokenizer's EOS, and the opening of the next user turn."""
    after = t.assistant.split("{content}", 1)[-1]
    opening = t.user.split("{content}", 1)[0].replace("{bos}", "")
    out = []
    for s in (after.replace("{eos}", "\0").split("\0")[0].strip(), tokenizer.eos_token or "", opening.strip()):
        if s and s not in out:
            out.append(s)
    return out


def _turns(*pairs: str) -> list[Message]:
    return [{"role": r, "content": c} for r, c in zip(pairs[::2], pairs[1::2])]


_PROBES = [_turns("user", "U1"), _turns("system", "S1", "user", "U1"),
           _turns("user", "U1", "assistant", "A1", "user", "U2"),
           _turns("system", "S1", "user", "U1", "assistant", "A1", "user", "U2")]


def matching_template(tokenizer) -> Optional[Template]:
    """The registry template (with the default system text read off the chat template) that renders every probe
    conversation exactly as the tokenizer's own chat template does, or None. Lets a tokenizer-template model be
    written in formats that cannot run Jinja (an Ollama Modelfile)."""
    def text(template, msgs):
        return "".join(s for s, _ in segments(tokenizer, template, msgs, generation=True))

    want = [text(None, p) for p in _PROBES]
    marker = "\x00SYSTEM\x00"
    for t in TEMPLATES.values():
        head, _, tail = text(Template(**{**t.__dict__, "default_system": marker}), _PROBES[0]).partition(marker)
        defaults = [t.default_system, ""]
        if tail and want[0].startswith(head) and want[0].endswith(tail) and len(want[0]) >= len(head) + len(tail):
            defaults.insert(0, want[0][len(head):len(want[0]) - len(tail)])
        for default in defaults:
            candidate = Template(**{**t.__dict__, "default_system": default})
            if all(text(candidate, p) == w for p, w in zip(_PROBES, want)):
                return candidate
    return None


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
