"""`lorakit serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the engine: /v1/models, /v1/chat/completions,
/v1/completions (server-sent events or one JSON answer), /health; OpenAI error shapes, limits, bearer key, SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal, Optional, Union

from lora_kit.errors import LorakitError
from lora_kit.serve import vllm as vllm_backend
from lora_kit.serve.engine import Busy, Engine, Job, Sampling, Served, load_models

# fastapi, pydantic and uvicorn are the optional `lorakit[serve]` extra: imported here, so only `serve`/`ui` need them
try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException
except ImportError as e:  # pragma: no cover - the extra is missing
    raise LorakitError(f"`lorakit serve` needs the serve extra: pip install 'lorakit[serve]' ({e.name} is missing)")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> JSONResponse:
    """An error in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            411: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
    kind = kind.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class Part(BaseModel):
    """One text part of a message's content list."""
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message; content is text or a list of text parts."""
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[Part]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    """`stream_options`: include_usage adds a last chunk with the token counts."""
    include_usage: bool = False


class Common(BaseModel):
    """Fields both endpoints take; other OpenAI fields are accepted and ignored."""
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class ChatRequest(Common):
    """POST /v1/chat/completions."""
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(Common):
    """POST /v1/completions."""
    prompt: Union[str, list[str]]


class Guard:
    """ASGI middleware: bodies over `max_bytes` get 413 (POSTs must say their length), and with `api_key` every route
    but /health needs `Authorization: Bearer KEY` (401)."""

    def __init__(self, app, max_bytes: int, api_key: Optional[str]):
        self.app, self.max_bytes, self.api_key = app, max_bytes, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = None
        if self.api_key and scope["path"] != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                problem = error_body(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                     code="invalid_api_key")
        if problem is None and scope["method"] == "POST":
            length = headers.get("content-length")
            if length is None or not length.isdigit():
                problem = error_body(411, "POST bodies need a Content-Length header")
            elif int(length) > self.max_bytes:
                problem = error_body(413, f"request body is {length} bytes; the limit is {self.max_bytes} "
                                          "(--max-request-bytes)", code="request_too_large")
        if problem is not None:
            return await problem(scope, receive, send)
        return await self.app(scope, receive, send)


def _sampling(req: Common, limit: int, default_max: int, wanted: Optional[int]) -> Sampling:
    if wanted is not None and wanted > limit:
        raise HTTPException(413, f"max_tokens={wanted} is over this server's limit of {limit} (--max-tokens)")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise HTTPException(400, "stop: at most 4 non-empty strings")
    return Sampling(max_tokens=wanted or min(default_max, limit), temperature=req.temperature, top_p=req.top_p,
                    stop=stop, seed=req.seed)


def create_app(models: dict[str, Served], *, max_concurrent: int = 4, max_queue: int = 16, max_tokens: int = 512,
               max_request_bytes: int = 1 << 20, api_key: Optional[str] = None):
    """The FastAPI application serving `models` (what `lorakit serve` runs; tests and the UI build it too)."""
    engine = Engine(models, max_concurrent=max_concurrent, max_queue=max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_body(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error_body(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models), **engine.counts()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": s.name, "object": "model", "created": created, "owned_by": "lorakit", "root": s.path,
             "parent": None if s.adapter is None else s.base} for s in models.values()]}

    def find(name: str) -> Served:
        if name not in models:
            raise HTTPException(404, f"model '{name}' does not exist; served: {', '.join(models)}")
        return models[name]

    async def run(request: Request, req: Common, served: Served, prompt: list[int], wanted: Optional[int], kind: str):
        sampling = _sampling(req, max_tokens, 256, wanted)
        if len(prompt) + sampling.max_tokens > served.context_length():
            raise HTTPException(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({sampling.max_tokens}) is "
                                     f"over the model's context of {served.context_length()} tokens")
        job = Job(served, prompt, sampling, asyncio.get_running_loop())
        try:
            engine.submit(job)
        except Busy as e:
            return error_body(429 if not engine.stopping else 503, str(e), code="rate_limit_exceeded")
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        shape = _Shape(kind, rid, served.name)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(job, shape, usage), media_type="text/event-stream")
        return await _collect(request, job, shape)

    @app.post("/v1/chat/completions")
    async def chat(request: Request, req: ChatRequest):
        served = find(req.model)
        try:
            prompt = served.prompt([{"role": m.role, "content": m.text()} for m in req.messages])
        except LorakitError as e:
            raise HTTPException(400, f"messages: {e}")
        return await run(request, req, served, prompt, req.max_completion_tokens or req.max_tokens, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        served = find(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise HTTPException(400, "prompt: exactly one prompt per request")
        prompt = served.tokenizer(prompts[0])["input_ids"]
        return await run(request, req, served, prompt, req.max_tokens, "text")

    return Guard(app, max_request_bytes, api_key)


class _Shape:
    """The JSON objects of one answer, chat or text completion, whole or as stream chunks."""

    def __init__(self, kind: str, rid: str, model: str):
        self.kind, self.id, self.model, self.created = kind, rid, model, int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, reason: str, usage: dict) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, text: Optional[str], reason: Optional[str] = None, first: bool = False) -> dict:
        if self.kind == "chat":
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            return {**self._head("chat.completion.chunk"), "choices": [{"index": 0, "delta": delta,
                                                                        "finish_reason": reason}]}
        return {**self._head("text_completion"), "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                                              "finish_reason": reason}]}

    def usage_chunk(self, usage: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(job: Job, shape: _Shape, include_usage: bool):
    """Server-sent events of one job; leaving early (the client disconnected) cancels the job."""
    try:
        if shape.kind == "chat":
            yield _sse(shape.chunk(None, first=True))
        while True:
            event = await job.events.get()
            if event[0] == "text":
                yield _sse(shape.chunk(event[1]))
            elif event[0] == "done":
                yield _sse(shape.chunk(None, event[1]))
                if include_usage:
                    yield _sse(shape.usage_chunk(event[2]))
                break
            else:
                yield _sse({"error": {"message": event[1], "type": "server_error", "param": None, "code": None}})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


async def _collect(request: Request, job: Job, shape: _Shape):
    """One JSON answer; a client that disconnects while waiting cancels the job."""
    parts = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return error_body(499, "client disconnected")
                continue
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] == "done":
                return JSONResponse(shape.whole("".join(parts), event[1], event[2]))
            else:
                return error_body(503 if "shut down" in event[1] else 500, event[1])
    finally:
        job.cancel()


def parse_adapters(items: list[str]) -> dict[str, str]:
    """--adapter NAME=DIR (or just DIR, named after the directory) into {name: dir}, names unique."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = item.rstrip("/").rsplit("/", 1)[-1], item
        if not name or name in out:
            raise LorakitError(f"--adapter {item}: adapter names must be unique and non-empty (NAME=DIR)")
        out[name] = path
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Model, adapters, network and limits."""
    p.add_argument("--model", required=True, help="base model (alias, dir, hub id)")
    p.add_argument("--name", help="the base's model name in the API (default: the model directory's name)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter written by a lorakit stage, served as model NAME (repeat for several)")
    p.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback requires --api-key")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="bearer token every route but /health requires")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--max-concurrent", type=int, default=4, help="requests decoded at once (in turn, token by token)")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond those; more get 429")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens one request may generate (more: 413)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body (more: 413)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they end with an error")
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm"],
                   help="transformers: lorakit's own engine (every lorakit adapter, any vocabulary); vllm: vLLM's "
                        "OpenAI server, prepared and supervised by lorakit (--max-queue, --max-tokens and "
                        "--max-request-bytes are the transformers engine's; vLLM queues by its own scheduler)")
    p.add_argument("--vllm-python", help="vllm: interpreter of a venv with vLLM (default: $LORAKIT_VLLM_PYTHON, "
                                         "else this one)")
    p.add_argument("--max-model-len", type=int, default=2048, help="vllm: longest prompt + answer in tokens")
    p.add_argument("--vllm-args", help="vllm: more options for its server, as one string")


def check_host(host: str, api_key: Optional[str]) -> None:
    """Refuse to listen beyond loopback without a key."""
    if host not in LOOPBACK and not api_key:
        raise LorakitError(f"--host {host} reaches beyond this machine: pass --api-key KEY (or bind 127.0.0.1)")


def main(args) -> int:
    """Load the models, then serve until SIGTERM/SIGINT."""
    check_host(args.host, args.api_key)
    if args.backend == "vllm":
        return vllm_backend.main(args, parse_adapters(args.adapter))
    models = load_models(args.model, parse_adapters(args.adapter), base_name=args.name, dtype=args.dtype)
    app = create_app(models, max_concurrent=args.max_concurrent, max_queue=args.max_queue, max_tokens=args.max_tokens,
                     max_request_bytes=args.max_request_bytes, api_key=args.api_key)
    print(f"lorakit serve: {', '.join(models)} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.grace, log_level="warning")
    return 0
