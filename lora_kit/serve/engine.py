"""The generation engine behind `lorakit serve`: one base model per vocabulary with its adapters loaded on it (peft
multi-adapter), and one scheduler thread that decodes every active request a token at a time in turn.

Decoding in turn keeps queueing fair (a long answer never stalls a short one), lets a cancelled request leave at the
next token, and switches adapters per step over the shared base (`set_adapter` is a pointer swap, not a reload).
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from peft import PeftModel
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from lora_kit.errors import LorakitError
from lora_kit.models.builder import load_weights
from lora_kit.models.load import (
    adapter_base,
    adapter_tokenizer_template,
    check_adapter_files,
    check_adapter_fits,
    check_vocab,
    load_tokenizer,
    resolve_model,
)
from lora_kit.rundir import read_run
from lora_kit.templates import Template, prompt_ids, resolve, without_partial_char


@dataclass
class Served:
    """One model name of the API: a base (adapters disabled) or one adapter over it, with its tokenizer and template."""
    name: str
    net: Any  # the model holding this vocabulary's base (a PeftModel once an adapter is loaded on it)
    adapter: Optional[str]  # peft adapter name; None = the base itself
    tokenizer: Any
    template: Optional[Template]
    path: str
    base: str

    def prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat prompt rendered with this model's own template (as training and `lorakit chat` do)."""
        return prompt_ids(self.tokenizer, self.template, messages)

    def context_length(self) -> int:
        return int(getattr(self.net.config, "max_position_embeddings", 2048))


def _vocab_rows(adapter: str) -> Optional[int]:
    return (read_run(Path(adapter)).get("base_signature") or {}).get("vocab_size")


def _attach(net, adapter_dir: str, name: str):
    """Load one more adapter onto a base (the first turns it into a PeftModel)."""
    check_adapter_files(adapter_dir)
    check_adapter_fits(adapter_dir, net.get_base_model() if isinstance(net, PeftModel) else net)
    if isinstance(net, PeftModel):
        net.load_adapter(adapter_dir, adapter_name=name)
        return net
    return PeftModel.from_pretrained(net, adapter_dir, adapter_name=name)


def load_models(model: str, adapters: dict[str, str], *, base_name: Optional[str] = None, dtype: str = "auto",
                trust_remote_code: bool = False) -> dict[str, Served]:
    """Every served name: the base under `base_name` and each adapter by its name. Adapters whose vocabulary differs
    from the base's run over their own recorded base (the extended model `extend-vocab` wrote), loaded once for all
    adapters on that vocabulary; so each distinct vocabulary costs one copy of the base in memory."""
    base = resolve_model(model)
    base_name = base_name or Path(base).name
    if base_name in adapters:
        raise LorakitError(f"--adapter {base_name}: that name is the base model's (--name)")
    bases: dict[str, Any] = {base: load_weights(base, dtype=dtype, trust_remote_code=trust_remote_code)}
    rows = bases[base].get_input_embeddings().weight.shape[0]
    groups: dict[str, list[tuple[str, str]]] = {base: []}
    for name, path in adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise LorakitError(f"--adapter {name}={path}: not an adapter directory (no adapter_config.json)")
        want = _vocab_rows(path)
        home = base if want in (None, rows) else resolve_model(adapter_base(path))
        groups.setdefault(home, []).append((name, path))
    served: dict[str, Served] = {}
    base_tok = load_tokenizer(base, trust_remote_code)
    for home, members in groups.items():
        net = bases.get(home) or load_weights(home, dtype=dtype, trust_remote_code=trust_remote_code)
        for name, path in members:
            tok_source, template = adapter_tokenizer_template(path, home)
            tokenizer = load_tokenizer(tok_source, trust_remote_code)
            net = _attach(net, path, name)
            check_vocab(net, tokenizer, tok_source)
            served[name] = Served(name, net, name, tokenizer, resolve(template, tokenizer), path, home)
        for s in served.values():
            if s.base == home:
                s.net = net  # the PeftModel that now holds every adapter of this vocabulary
        if home == base:
            served[base_name] = Served(base_name, net, None, base_tok, resolve("auto", base_tok), base, base)
        net.eval()
    return {name: served[name] for name in [base_name, *adapters]}


@dataclass
class Sampling:
    """The OpenAI sampling parameters a request may set."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None


class Busy(Exception):
    """Every slot and queue place is taken (answered with 429)."""


class Job:
    """One request's generation: prompt, sampling, state, and the events it sends back to the event loop."""

    def __init__(self, served: Served, prompt: list[int], sampling: Sampling, loop: asyncio.AbstractEventLoop):
        self.served, self.prompt, self.sampling, self.loop = served, prompt, sampling, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.generated: list[int] = []
        self.cache = None
        self.sent = 0  # characters of the answer already sent
        self.cancelled = False
        self.finished = False
        self.last_event: Optional[tuple] = None  # "done"/"error", sent once the job has left the engine's slots
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        warpers = []
        if sampling.temperature > 0:
            warpers = [TemperatureLogitsWarper(sampling.temperature)]
            if sampling.top_p < 1.0:
                warpers.append(TopPLogitsWarper(sampling.top_p))
        self.warpers = LogitsProcessorList(warpers)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """Stop generating at the next token (the client went away)."""
        self.cancelled = True

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.generated),
                "total_tokens": len(self.prompt) + len(self.generated)}


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to keep unsent: a partial UTF-8 character (decoded as one U+FFFD that the next
    byte may complete; earlier ones are final), or the start of a stop string."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class Engine:
    """Runs jobs on one thread: up to `max_concurrent` decode in turn, `max_queue` more wait, beyond that Busy."""

    def __init__(self, models: dict[str, Served], max_concurrent: int = 4, max_queue: int = 16):
        self.models, self.max_concurrent, self.max_queue = models, max_concurrent, max_queue
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def counts(self) -> dict:
        """Active and queued jobs (for /health)."""
        with self.cond:
            return {"active": len(self.active), "queued": len(self.waiting)}

    def submit(self, job: Job) -> None:
        """Queue a job; raises Busy when the server is full or shutting down."""
        with self.cond:
            if self.stopping:
                raise Busy("the server is shutting down")
            if len(self.active) + len(self.waiting) >= self.max_concurrent + self.max_queue:
                raise Busy(f"{self.max_concurrent} requests are running and {self.max_queue} waiting; retry later")
            self.waiting.append(job)
            self.cond.notify()

    def stop(self) -> None:
        """End every unfinished job with an error and stop the thread (SIGTERM after the grace period)."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=30)
        for job in self.active + list(self.waiting):
            if not job.finished:
                job.emit("error", "the server shut down before this request finished")

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.active and not self.waiting:
                    self.cond.wait()
                if self.stopping:
                    return
                while self.waiting and len(self.active) < self.max_concurrent:
                    job = self.waiting.popleft()
                    if not job.cancelled:
                        self.active.append(job)
                turn = list(self.active)
            for job in turn:
                if not job.cancelled:
                    try:
                        self._step(job)
                    except Exception as e:  # a bug or out of memory: this request fails, the server keeps going
                        job.finished = True
                        job.last_event = ("error", f"generation failed: {type(e).__name__}: {e}")
                if job.cancelled or job.finished:
                    job.cache = None
                    with self.cond:
                        self.active.remove(job)
                    if job.last_event:  # after the slot is free: a client's next request must find room
                        job.emit(*job.last_event)

    def _forward(self, job: Job, ids: torch.Tensor):
        s = job.served
        with torch.inference_mode():
            if s.adapter is None and hasattr(s.net, "disable_adapter"):
                with s.net.disable_adapter():
                    return s.net(input_ids=ids, past_key_values=job.cache, use_cache=True)
            if s.adapter is not None:
                s.net.set_adapter(s.adapter)
            return s.net(input_ids=ids, past_key_values=job.cache, use_cache=True)

    def _step(self, job: Job) -> None:
        """One token for one job: forward (prompt first, then the last token over the cache), pick, send new text."""
        tok = job.served.tokenizer
        ids = torch.tensor([job.prompt if job.cache is None else job.generated[-1:]])
        out = self._forward(job, ids)
        job.cache = out.past_key_values
        scores = out.logits[:, -1, :].float()
        if job.sampling.temperature > 0:
            scores = job.warpers(torch.tensor([job.prompt + job.generated]), scores)
            token = int(torch.multinomial(torch.softmax(scores, dim=-1)[0], 1, generator=job.generator))
        else:
            token = int(scores[0].argmax())
        job.generated.append(token)
        eos = token == tok.eos_token_id
        text = tok.decode(job.generated[:-1] if eos else job.generated, skip_special_tokens=True)
        reason = "stop" if eos else None
        for s in job.sampling.stop:
            at = text.find(s, max(0, job.sent - len(s)))
            if at >= 0:
                text, reason = text[:at], "stop"
        if reason is None and len(job.generated) >= job.sampling.max_tokens:
            reason = "length"
        if reason:
            text = without_partial_char(text)
        end = len(text) if reason else len(text) - _held_back(text, job.sampling.stop)
        if end > job.sent:
            job.emit("text", text[job.sent:end])
            job.sent = end
        if reason:
            job.finished = True
            job.last_event = ("done", reason, job.usage())
