"""`lorakit merge --format gguf --ollama`: the Modelfile's TEMPLATE, rendered by Go's text/template (the engine Ollama
runs), gives exactly the prompt text lorakit trained on, for every registry template and for a tokenizer chat template
matched to one; plus the Modelfile's other lines and the refusals. The Go rendering needs `go` (Debian golang-go)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from lora_kit.cli import main
from lora_kit.templates import TEMPLATES, as_go_template, matching_template, segments, stop_strings
from merge_helpers import make_adapter

GO = shutil.which("go")
needs_go = pytest.mark.skipif(GO is None, reason="go not installed (Debian golang-go): Ollama's template engine")
RENDER = Path(__file__).parent / "go" / "render_template.go"
SMOLLM_LIKE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
               "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "判断下面这条评论的情感：房间很干净。"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "你好"}],
    [{"role": "user", "content": 'quotes " and \\ backslash, {{ braces }} and\nnewlines\t'},
     {"role": "assistant", "content": "好的。"}, {"role": "user", "content": "再说一遍"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "一"}, {"role": "assistant", "content": "二"},
     {"role": "user", "content": "三"}],
]


def go_render(template: str, cases: list[dict], tmp_path: Path) -> list[str]:
    out = subprocess.run([GO, "run", str(RENDER)], input=json.dumps({"template": template, "cases": cases}),
                         capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"HOME": str(tmp_path), "GOCACHE": str(Path.home() / ".cache" / "go-build"),
                              "PATH": "/usr/bin:/bin", "GOFLAGS": "-mod=mod", "GO111MODULE": "off"})
    return json.loads(out.stdout)


def ollama_values(template, messages: list[dict]) -> dict:
    """What Ollama passes the TEMPLATE: .System from the conversation's system message, or else the Modelfile's SYSTEM
    (the template's default), and every message (system included) as .Messages."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else template.default_system
    return {"system": system, "messages": messages}


def lorakit_text(tok, template, messages) -> str:
    return "".join(s for s, _ in segments(tok, template, messages, generation=True))


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@needs_go
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_go_template_renders_the_training_text(name, tok, tmp_path):
    t = TEMPLATES[name]
    want = [lorakit_text(tok, t, c) for c in CONVERSATIONS]
    got = go_render(as_go_template(t, tok), [ollama_values(t, c) for c in CONVERSATIONS], tmp_path)
    assert got == want
    # when the runtime adds BOS itself, the template leaves out exactly that first one
    got = go_render(as_go_template(t, tok, skip_leading_bos=True), [ollama_values(t, c) for c in CONVERSATIONS],
                    tmp_path)
    leads = t.prefix.startswith("{bos}") or (not t.prefix and t.user.startswith("{bos}"))  # a {bos} comes first
    assert leads == (name in ("alpaca", "vicuna", "llama2", "chinese-alpaca-2"))
    assert got == [w[len(tok.bos_token):] if leads else w for w in want]  # llama2's later turns keep theirs


def test_a_tokenizer_chat_template_is_matched_to_the_registry(tok):
    smol = AutoTokenizer.from_pretrained(tok.name_or_path)
    smol.chat_template = SMOLLM_LIKE
    t = matching_template(smol)
    assert t is not None and t.user == TEMPLATES["chatml"].user
    assert t.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for c in CONVERSATIONS:
        assert lorakit_text(smol, t, c) == lorakit_text(smol, None, c)
    assert stop_strings(t, smol) == list(dict.fromkeys(["<|im_end|>", smol.eos_token, "<|im_start|>user"]))
    odd = AutoTokenizer.from_pretrained(tok.name_or_path)
    odd.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    assert matching_template(odd) is None


def with_chat_template(src: Path, dst: Path, chat_template: str) -> Path:
    """A copy of the tiny model whose tokenizer carries `chat_template` (transformers 5 keeps it in its own file)."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return dst


def modelfile_fields(text: str) -> dict:
    return {"from": re.search(r"^FROM (.+)$", text, re.M).group(1),
            "template": re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1),
            "system": (re.search(r'^SYSTEM """(.*?)"""$', text, re.M | re.S) or [None, None])[1],
            "stop": [json.loads(v) for v in re.findall(r"^PARAMETER stop (.+)$", text, re.M)],
            "params": dict(re.findall(r"^PARAMETER (?!stop )(\w+) (\S+)$", text, re.M))}


@pytest.mark.parametrize("template", ["chatml", "tokenizer"])
def test_merge_writes_a_modelfile_with_the_training_template(template, tiny_model_dir, tmp_path):
    base = with_chat_template(tiny_model_dir, tmp_path / "base", SMOLLM_LIKE)
    ad = make_adapter(base, tmp_path / "ad")
    (ad / "recipe.yaml").write_text(yaml.safe_dump({"template": template}))
    out = tmp_path / "out"
    assert main(["merge", "--adapter", str(ad), "--output", str(out), "--format", "gguf", "--ollama"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model-f16.gguf", "run.json"]
    assert json.loads((out / "run.json").read_text())["ollama_modelfile"] == "Modelfile"
    fields = modelfile_fields((out / "Modelfile").read_text())
    tok = AutoTokenizer.from_pretrained(ad)
    t = TEMPLATES["chatml"] if template == "chatml" else matching_template(tok)
    assert fields["from"] == "./model-f16.gguf" and fields["stop"] == stop_strings(t, tok)
    assert fields["system"] == (None if template == "chatml" else
                                "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert fields["params"] == {"temperature": "0", "top_p": "0.9", "num_predict": "256", "num_ctx": "512"}
    if GO:
        got = go_render(fields["template"], [ollama_values(t, c) for c in CONVERSATIONS], tmp_path)
        assert got == [lorakit_text(tok, t if template == "chatml" else None, c) for c in CONVERSATIONS]


def test_ollama_refusals(tiny_model_dir, tmp_path, capsys):
    ad = make_adapter(tiny_model_dir, tmp_path / "ad")
    assert main(["merge", "--adapter", str(ad), "--output", str(tmp_path / "hf"), "--ollama"]) == 2
    assert "--ollama writes a Modelfile beside a GGUF file: add --format gguf" in capsys.readouterr().err
    base = with_chat_template(tiny_model_dir, tmp_path / "odd",
                              "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    ad = make_adapter(base, tmp_path / "ad2")
    (ad / "recipe.yaml").write_text(yaml.safe_dump({"template": "auto"}))
    assert main(["merge", "--adapter", str(ad), "--output", str(tmp_path / "g"), "--format", "gguf", "--ollama"]) == 2
    err = capsys.readouterr().err
    assert "renders like no registry template" in err.splitlines()[-1] and err.count("error:") == 1
    assert not (tmp_path / "g").exists()  # nothing half-written
