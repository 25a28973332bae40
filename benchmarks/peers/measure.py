"""Run one training command in this process and measure it the same way for every tool (lorakit, LLaMA-Factory, TRL):
all three train through a transformers `Trainer` subclass, so a patch of `Trainer.training_step` sees every batch
actually consumed, whatever collator, packing or template the tool uses.

    python measure.py --result OUT.json -- -m lora_kit.cli sft ...      (a module, like python -m)
    python measure.py --result OUT.json -- script.py args ...           (a script)
    python measure.py --result OUT.json --profile 3 -- ...              (also profile 3 training steps after 2)

Writes OUT.json: non-padding tokens consumed, training time (first to last optimizer step's end, i.e. `train()`),
wall time of the whole command, peak RSS (this process and its children: datasets map workers), CUDA peak allocated
memory, per-step losses; with --profile N, the self CPU time of the top torch ops over N forward+backward passes
(`Trainer.training_step`, after two warm-up steps; the profiler slows those steps, so such a run's speed is not a
figure). Uses only the standard library and transformers, so it runs in each tool's own venv.

Step-time breakdown (OUT.json `breakdown`): the wall time of each optimizer step after the first two, split into the
parts every tool runs through the same transformers and accelerate calls: data (`Trainer.get_batch_samples`, which
draws the batches and runs the collator), forward (`Trainer.training_step` less its backward: input preparation, the
model's forward and the loss), backward (`Accelerator.backward`), clip (`Accelerator.clip_grad_norm_`), optimizer
(`AcceleratedOptimizer.step`), callbacks (`CallbackHandler.call_event`: progress bars, metrics, the tools' own hooks),
log/save (`Trainer._maybe_log_save_evaluate` less the callbacks it calls) and the rest of `train()`'s loop (lr
scheduler, zero_grad, loss bookkeeping). Each part's time is exclusive: time in a part nested inside another counts to
the inner one. A loss that forms its gradient in the forward (lorakit's fused head) moves that work from backward to
forward, so compare forward + backward across tools.

Non-padding tokens, per batch: with a 2-D attention mask, its non-zero entries (LLaMA-Factory's neat_packing puts
segment numbers 1, 2, ... there); otherwise (packed rows with position_ids, padding-free rows, 4-D masks) each row's
length less its trailing run of pad tokens (all collators here pad on the right; a row's own final EOS, when EOS is the
pad token as in SmolLM2, is lost too: at most one token per row, the same for every tool).
"""
from __future__ import annotations

import functools
import json
import resource
import runpy
import sys
import time


def _row_tokens(ids, pad_id) -> int:
    n = len(ids)
    if pad_id is None:
        return n
    while n and ids[n - 1] == pad_id:
        n -= 1
    return n


def count_tokens(inputs: dict, pad_id) -> int:
    mask = inputs.get("attention_mask")
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
        return int((mask != 0).sum())
    ids = inputs["input_ids"]
    return sum(_row_tokens(row, pad_id) for row in ids.tolist())


def _pad_id(trainer):
    for src in (getattr(trainer, "processing_class", None), getattr(trainer, "tokenizer", None)):
        tok = getattr(src, "tokenizer", src)  # a processor wraps its tokenizer
        if getattr(tok, "pad_token_id", None) is not None:
            return tok.pad_token_id
    model = getattr(trainer, "model", None)
    return getattr(getattr(model, "config", None), "pad_token_id", None)


WARMUP = 2  # training steps before profiling starts


def profiled(prof, steps: int) -> dict:
    """The top ops by self CPU time, in seconds per profiled step."""
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) / 1e6 / steps
    return {"steps": steps, "self_s_per_step": total,
            "ops": [[e.key, e.self_cpu_time_total / 1e6 / steps, e.count // steps] for e in ops[:40]]}


PARTS = ("data", "forward", "backward", "clip", "optimizer", "callbacks", "log_save")


class StepClock:
    """Exclusive wall time per part (see the module's docstring), and a snapshot after WARMUP optimizer steps."""

    def __init__(self):
        self.totals = dict.fromkeys(PARTS, 0.0)
        self.stack = []  # [part, start, time spent in nested parts]
        self.steps = 0
        self.mark = None  # (time, totals) once WARMUP optimizer steps are done

    def wrap(self, owner, name: str, part: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:  # an older or newer library without this method: that part reads 0
            return
        clock = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            frame = [part, time.perf_counter(), 0.0]
            clock.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                clock.stack.pop()
                elapsed = time.perf_counter() - frame[1]
                clock.totals[part] += elapsed - frame[2]
                if clock.stack:
                    clock.stack[-1][2] += elapsed
                if part == "optimizer":
                    clock.steps += 1
                    if clock.steps == WARMUP:
                        clock.mark = (time.perf_counter(), dict(clock.totals))

        setattr(owner, name, timed)

    def breakdown(self, end: float) -> dict | None:
        if self.mark is None or self.steps <= WARMUP:
            return None
        n = self.steps - WARMUP
        per = {k: (self.totals[k] - self.mark[1][k]) / n for k in PARTS}
        wall = (end - self.mark[0]) / n
        per["rest"] = wall - sum(per.values())
        return {"steps": n, "wall_per_step_s": wall, "per_step_s": per}


def install(stats: dict, profile_steps: int = 0) -> None:
    import accelerate
    import accelerate.optimizer
    import transformers
    import transformers.trainer_callback

    clock = StepClock()
    clock.wrap(transformers.Trainer, "get_batch_samples", "data")
    clock.wrap(accelerate.Accelerator, "backward", "backward")
    clock.wrap(accelerate.Accelerator, "clip_grad_norm_", "clip")
    clock.wrap(accelerate.optimizer.AcceleratedOptimizer, "step", "optimizer")
    clock.wrap(transformers.trainer_callback.CallbackHandler, "call_event", "callbacks")
    clock.wrap(transformers.Trainer, "_maybe_log_save_evaluate", "log_save")
    step, train = transformers.Trainer.training_step, transformers.Trainer.train
    prof = []

    def training_step(self, model, inputs, *args, **kwargs):
        stats["tokens"] += count_tokens(inputs, _pad_id(self))
        stats["rows"] += int(inputs["input_ids"].shape[0])
        stats["padded_positions"] += int(inputs["input_ids"].numel())
        done = len(stats["losses"])
        if profile_steps and done == WARMUP:
            import torch

            prof.append(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]))
            prof[0].__enter__()
        loss = step(self, model, inputs, *args, **kwargs)
        stats["losses"].append(float(loss.detach().float().mean()))
        if prof and done + 1 == WARMUP + profile_steps:
            prof[0].__exit__(None, None, None)
            stats["profile"] = profiled(prof[0], profile_steps)
        return loss

    def timed_train(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return train(self, *args, **kwargs)
        finally:
            end = time.perf_counter()
            stats["train_s"] = end - start
            stats["breakdown"] = clock.breakdown(end)

    transformers.Trainer.training_step = training_step
    clock.wrap(transformers.Trainer, "training_step", "forward")  # outermost: the token count runs inside it
    transformers.Trainer.train = timed_train


def main() -> None:
    argv = sys.argv[1:]
    profile_steps = 0
    if len(argv) > 4 and argv[2] == "--profile":
        profile_steps, argv = int(argv[3]), argv[:2] + argv[4:]
    if len(argv) < 3 or argv[0] != "--result" or argv[2] != "--":
        sys.exit(__doc__)
    result, target = argv[1], argv[3:]
    stats = {"tokens": 0, "rows": 0, "padded_positions": 0, "losses": [], "train_s": None}
    start = time.perf_counter()
    install(stats, profile_steps)
    code = 0
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    stats["wall_s"] = time.perf_counter() - start
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    stats["peak_rss_mb"] = rss / 1024  # Linux reports KiB
    try:
        import torch

        if torch.cuda.is_available():
            stats["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    stats["exit_code"] = code
    with open(result, "w", encoding="utf-8") as f:
        json.dump(stats, f)
    sys.exit(code)


if __name__ == "__main__":
    main()
