"""The serve engine without HTTP: a finished request has left the engine's slots by the time its client hears "done",
so a client sending its next request at once is never told the server is busy; an answer cut inside a character ends
as `lorakit chat` and vLLM end it."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from lora_kit.serve.chat import reply
from lora_kit.serve.engine import Engine, Job, Sampling, load_models


class RecordingJob(Job):
    """A job that notes, as its last event leaves the engine thread, how many jobs the engine still holds."""

    def __init__(self, engine: Engine, *args):
        super().__init__(*args)
        self.engine, self.counts_at_end = engine, None

    def emit(self, *event) -> None:
        if event[0] in ("done", "error"):
            self.counts_at_end = self.engine.counts()
        super().emit(*event)


def test_a_finished_job_frees_its_slot_before_done(tiny_model_dir):
    served = load_models(str(tiny_model_dir), {}, base_name="base", dtype="fp32")["base"]
    engine = Engine({"base": served}, max_concurrent=1, max_queue=0)
    engine.start()

    async def one_request() -> tuple:
        job = RecordingJob(engine, served, [1, 2, 3], Sampling(max_tokens=3, temperature=0), asyncio.get_running_loop())
        engine.submit(job)
        while (event := await job.events.get())[0] == "text":
            pass
        return job, event

    async def two_in_a_row():
        first, event = await one_request()
        second, _ = await one_request()  # the Busy refusal this test guards against would raise here
        return first, event, second

    try:
        first, event, second = asyncio.run(two_in_a_row())
    finally:
        engine.stop()
    assert event[0] == "done" and event[2]["completion_tokens"] == 3
    assert first.counts_at_end == {"active": 0, "queued": 0}
    assert second.counts_at_end == {"active": 0, "queued": 0}


def _answer(engine: Engine, served, prompt: list[int], max_tokens: int) -> str:
    async def run() -> str:
        job = Job(served, prompt, Sampling(max_tokens=max_tokens, temperature=0), asyncio.get_running_loop())
        engine.submit(job)
        parts = []
        while (event := await job.events.get())[0] == "text":
            parts.append(event[1])
        assert event[:2] == ("done", "length")
        return "".join(parts)
    return asyncio.run(run())


@pytest.mark.parametrize("max_tokens", [1, 2])
def test_an_answer_cut_inside_a_character_drops_only_its_unfinished_bytes(tiny_model_dir, capsys, max_tokens):
    """A model rigged to always pick the lead byte of a three-byte character (好 = e5 a5 bd): its raw decode ends in
    U+FFFD. The server sends that text without the last, unfinished character (earlier invalid bytes stay U+FFFD),
    and `lorakit chat` prints and returns the same."""
    served = load_models(str(tiny_model_dir), {}, base_name="base", dtype="fp32")["base"]
    tok = served.tokenizer
    lead = tok.convert_tokens_to_ids("å")  # the byte-level alphabet's symbol for the byte 0xe5
    assert tok.decode([lead]) == "\ufffd" and tok.decode([lead] * 2) == "\ufffd" * 2
    head = torch.nn.Linear(served.net.config.hidden_size, served.net.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[lead] = 10.0
    served.net.lm_head = head
    prompt = served.prompt([{"role": "user", "content": "你好"}])
    engine = Engine({"base": served}, max_concurrent=1, max_queue=0)
    engine.start()
    try:
        sent = _answer(engine, served, prompt, max_tokens)
    finally:
        engine.stop()
    assert sent == "\ufffd" * (max_tokens - 1)
    args = SimpleNamespace(max_new_tokens=max_tokens, temperature=0.0, top_p=1.0)
    capsys.readouterr()
    said = reply(served.net, tok, served.template, [{"role": "user", "content": "你好"}], args)
    assert said == sent and capsys.readouterr().out == sent + "\n"
