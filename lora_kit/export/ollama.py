"""`lorakit merge --format gguf --ollama`: a Modelfile beside the GGUF, so `ollama create NAME -f DIR/Modelfile` gives
the prompts the model was trained on: the training template as Ollama's Go TEMPLATE (rendering exactly lorakit's
text), its default system text as SYSTEM, its end-of-turn markers as stops, and lorakit chat's sampling defaults.
"""
from __future__ import annotations

import json

from lora_kit.errors import LorakitError
from lora_kit.export.gguf_tokenizer import adds_bos
from lora_kit.templates import TEMPLATES, as_go_template, matching_template, resolve, stop_strings

PARAMETERS = {"temperature": 0, "top_p": 0.9, "num_predict": 256}  # lorakit chat's defaults (greedy)
MAX_CONTEXT = 8192  # num_ctx: the model's trained context, capped (Ollama allocates the KV cache for all of it)


def training_template(tokenizer, name: str, where: str):
    """The registry template a model trained with `template=name` used; a tokenizer chat template is matched to the
    registry template that renders it identically (Ollama cannot run Jinja), or refused."""
    t = resolve(name, tokenizer)
    if t is not None:
        return t
    t = matching_template(tokenizer)
    if t is None:
        raise LorakitError(f"{where}: the tokenizer's chat template renders like no registry template "
                           f"({', '.join(TEMPLATES)}), so --ollama cannot write it as a Go TEMPLATE; train with "
                           "template=NAME, or write the Modelfile's TEMPLATE yourself")
    return t


def modelfile(gguf_name: str, tokenizer, template, context: int) -> str:
    """The Modelfile text for the GGUF file `gguf_name` in the same directory."""
    if '"""' in template.default_system:
        raise LorakitError(f"template {template.name}: its system text holds \"\"\", which a Modelfile cannot quote")
    lines = [f"# lorakit merge --ollama: `ollama create NAME -f Modelfile`; template '{template.name}' as trained",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{as_go_template(template, tokenizer, skip_leading_bos=adds_bos(tokenizer))}"""']
    if template.default_system:
        lines.append(f'SYSTEM """{template.default_system}"""')
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stop_strings(template, tokenizer)]
    lines += [f"PARAMETER {k} {v}" for k, v in PARAMETERS.items()]
    lines.append(f"PARAMETER num_ctx {min(context, MAX_CONTEXT)}")
    return "\n".join(lines) + "\n"
