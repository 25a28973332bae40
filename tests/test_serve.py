"""`lorakit serve`: a real server on 127.0.0.1 over a tiny model and two tiny adapters, talked to with the official
`openai` client; greedy answers equal `lorakit chat`'s, errors have the OpenAI shape, limits and the API key hold."""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.request

import httpx
import pytest

from serve_helpers import build_adapter, build_extended_base, free_port, lorakit_server

openai = pytest.importorskip("openai", reason="the serve tests talk to the server with the official openai client")

PROMPT = "今天天气很好"
NEW = 12


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    a = build_adapter(tiny_model_dir, root / "a", seed=1)
    b = build_adapter(tiny_model_dir, root / "b", seed=2, template="alpaca")  # its own template, unlike a and the base
    new_ids = build_extended_base(tiny_model_dir, root / "zh-base", ["天气很好", "今天天"])
    zh = build_adapter(root / "zh-base", root / "zh", seed=4, token_rows=new_ids)  # extended vocabulary, rows trained
    return {"a": a, "b": b, "zh": zh}


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters):
    port = free_port()
    args = ["serve", "--model", str(tiny_model_dir), "--name", "base", "--dtype", "fp32", "--adapter",
            f"a={adapters['a']}", "--adapter", f"b={adapters['b']}", "--adapter", f"zh={adapters['zh']}",
            "--max-concurrent", "1", "--max-queue", "0",
            "--max-tokens", "64"]
    with lorakit_server(args, port) as proc:
        yield f"http://127.0.0.1:{port}", proc


def client(url, key="unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def chat_cli(model=None, adapter=None) -> str:
    """`lorakit chat --prompt` greedy answer (stdout, the streamer's final newline removed)."""
    cmd = [sys.executable, "-m", "lora_kit.cli", "chat", "--dtype", "fp32", "--max-new-tokens", str(NEW), "--prompt",
           PROMPT] + (["--model", str(model)] if model else []) + (["--adapter", str(adapter)] if adapter else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert out.endswith("\n")
    return out[:-1]


def idle(url):
    health = json.loads(urllib.request.urlopen(f"{url}/health").read())
    return health["active"] == 0 and health["queued"] == 0


def test_models_listed(server):
    names = [m.id for m in client(server[0]).models.list().data]
    assert names == ["base", "a", "b", "zh"]


def test_adapters_switch_and_match_chat(server, tiny_model_dir, adapters):
    c = client(server[0])
    answers = {}
    for name in ("a", "b", "zh", "base", "a"):  # back to a after the others: switching leaves nothing behind
        r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPT}], temperature=0,
                                      max_tokens=NEW)
        assert r.choices[0].message.role == "assistant"
        assert r.usage.completion_tokens <= NEW and r.usage.prompt_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        answers.setdefault(name, []).append(r.choices[0].message.content)
    assert answers["a"][0] == answers["a"][1]
    assert len({answers[n][0] for n in ("a", "b", "zh", "base")}) == 4
    assert answers["a"][0] == chat_cli(tiny_model_dir, adapters["a"])
    assert answers["b"][0] == chat_cli(tiny_model_dir, adapters["b"])  # rendered with b's alpaca template
    assert answers["base"][0] == chat_cli(tiny_model_dir)
    # over its own extended base (loaded once for its vocabulary), as `lorakit chat --adapter` loads it from run.json
    assert answers["zh"][0] == chat_cli(adapter=adapters["zh"])


def test_streaming_equals_whole_answer(server):
    c = client(server[0])
    msgs = [{"role": "user", "content": PROMPT}]
    whole = c.chat.completions.create(model="a", messages=msgs, temperature=0, max_tokens=NEW)
    chunks = list(c.chat.completions.create(model="a", messages=msgs, temperature=0, max_tokens=NEW, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # it did stream
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason


def test_completions_sampling_seed_and_stop(server):
    c = client(server[0])
    kw = dict(model="base", prompt="The quick brown", max_tokens=20, temperature=1.0, top_p=0.9)
    first, again = (c.completions.create(seed=7, **kw).choices[0].text for _ in range(2))
    assert first == again  # the same seed samples the same answer
    assert len({c.completions.create(seed=s, **kw).choices[0].text for s in range(1, 6)}) > 1
    greedy = c.completions.create(model="base", prompt="The quick brown", max_tokens=20, temperature=0)
    text = greedy.choices[0].text
    assert greedy.choices[0].finish_reason == "length" and greedy.usage.completion_tokens == 20
    stop = text.strip()[3:5]  # a piece from the middle of the greedy answer
    cut = c.completions.create(model="base", prompt="The quick brown", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.find(stop)]


def test_openai_errors(server):
    c = client(server[0])
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "not_found_error" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="a", messages=[])
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=1000)
    assert e.value.status_code == 413
    as_json = {"content-type": "application/json"}
    r = httpx.post(f"{server[0]}/v1/chat/completions", content=b"{not json", headers=as_json)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{server[0]}/v1/completions", content=b"x" * (2 << 20), headers=as_json)
    assert r.status_code == 413


def test_busy_then_disconnect_frees_the_slot(server):
    url = server[0]
    c = client(url)
    msgs = [{"role": "user", "content": PROMPT}]
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"model": "a", "messages": msgs, "max_tokens": 64, "stream": True, "temperature": 0}) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data:"))  # it is running: the one slot is taken
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="a", messages=msgs, max_tokens=4)
    # the stream was closed after its first chunk; the server notices, stops generating and frees the slot
    deadline = time.time() + 30
    while not idle(url) and time.time() < deadline:
        time.sleep(0.2)
    assert idle(url)
    assert c.chat.completions.create(model="a", messages=msgs, max_tokens=4).choices[0].message.content is not None


def test_api_key_required_off_loopback(tiny_model_dir):
    port = free_port()
    refused = subprocess.run([sys.executable, "-m", "lora_kit.cli", "serve", "--model", str(tiny_model_dir),
                              "--host", "0.0.0.0", "--port", str(port)], capture_output=True, text=True)
    assert refused.returncode == 2 and "--api-key" in refused.stderr
    args = ["serve", "--model", str(tiny_model_dir), "--name", "base", "--host", "0.0.0.0", "--api-key", "s3cret"]
    with lorakit_server(args, port):  # /health answers without the key
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert [m.id for m in client(url, "s3cret").models.list().data] == ["base"]


def test_sigterm_ends_streams_and_exits(tiny_model_dir):
    port = free_port()
    args = ["serve", "--model", str(tiny_model_dir), "--name", "base", "--grace", "1", "--max-tokens", "400"]
    with lorakit_server(args, port) as proc:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"model": "base", "prompt": "hello", "max_tokens": 400, "stream": True}) as r:
            lines = r.iter_lines()
            next(l for l in lines if l.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(httpx.HTTPError):  # it finishes within the grace period or is cut off after it
                for _ in lines:
                    pass
        # and the server exits, nothing hangs (uvicorn re-raises the SIGTERM once its graceful shutdown is done)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
