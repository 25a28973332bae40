"""The serve engine without HTTP: a finished request has left the engine's slots by the time its client hears "done",
so a client sending its next request at once is never told the server is busy."""
from __future__ import annotations

import asyncio

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
