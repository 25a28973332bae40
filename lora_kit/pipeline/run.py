"""`lorakit pipeline`: run a pipeline plan stage by stage through each stage's own `lorakit` command (one child process
per stage, so each stage's time and peak memory are its own), caching finished stages by fingerprint and resuming
killed ones; evaluate after each stage and write OUT/report.md and OUT/report.html.

OUT/pipeline.json holds the recipe and overrides; OUT/<n>-<stage>/stage.json the stage's fingerprint and state.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from lora_kit.errors import LorakitError
from lora_kit.evaluate.suite import run_suite
from lora_kit.pipeline.plan import (
    ADAPTER_STAGES,
    ORDER_TEXT,
    TRAINING,
    Config,
    Plan,
    Stage,
    build_plan,
    eval_fingerprint,
)
from lora_kit.pipeline.report import write_report
from lora_kit.rundir import is_finished, write_json
from lora_kit.training.interrupt import NAMES, Interrupted

STATE = "stage.json"
PLAN_FILE = "pipeline.json"
EVAL_FILE = "eval.json"
__all__ = ["Config", "add_arguments", "main"]  # Config: the pipeline recipe's keys (`lorakit recipes --show`)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--recipe, --from, --only, --status, --print-plan and key=value / STAGE.key=value overrides."""
    p.add_argument("--recipe", default="zh_pipeline", help="pipeline recipe name or YAML path (default: zh_pipeline)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun this stage and every stage after it")
    p.add_argument("--only", metavar="STAGE", help="rerun only this stage (the stages before it must be done)")
    p.add_argument("--status", metavar="OUT", help="print which stages of OUT are done, stale or pending, then exit")
    p.add_argument("--print-plan", action="store_true", help="print each stage's command and fingerprint, then exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"model=, output_dir=, ablate=STAGE, or STAGE.key=value for a stage's own keys ({ORDER_TEXT})")


def main(args) -> int:
    """Run (or show the status of) a pipeline."""
    if args.status:
        return print_status(Path(args.status))
    plan = build_plan(args.recipe, args.overrides)
    if args.print_plan:
        for s in plan.stages:
            print(f"{s.label}  [{s.fingerprint}]  lorakit {' '.join(s.argv) if s.argv else '(evaluation and report)'}")
        return 0
    if args.from_stage and args.only:
        raise LorakitError("give --from or --only, not both")
    t0 = time.time()
    run_plan(plan, args.recipe, args.overrides, from_stage=args.from_stage, only=args.only)
    branches = []
    for stage in plan.ablate:
        branch = build_plan(args.recipe, args.overrides, output_dir=str(plan.out / f"without-{stage}"),
                            ablate=[stage])
        print(f"lorakit pipeline: ablation branch without {stage}: {branch.out}", flush=True)
        run_plan(branch, args.recipe, args.overrides, ablate=[stage])
        branches.append((stage, branch))
    table = write_report(plan, branches)
    print(table)
    print(f"lorakit pipeline: finished in {time.time() - t0:.0f} s; report: {plan.out / 'report.md'}, "
          f"{plan.out / 'report.html'}")
    return 0


# ---------------------------------------------------------------------------------------------------- state
def read_state(path: Path) -> dict:
    """A stage's stage.json (empty when absent or cut off)."""
    try:
        return json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def stage_status(plan: Plan, stage: Stage) -> str:
    """done (finished, fingerprint matches), stale (finished with another fingerprint), partial (started: resumable
    when its fingerprint matches) or pending."""
    state = read_state(plan.stage_dir(stage))
    if not state:
        return "pending"
    if state.get("fingerprint") != stage.fingerprint:
        return "stale"
    return "done" if state.get("status") == "done" else "partial"


def print_status(out: Path) -> int:
    """`--status OUT`: each stage of the pipeline recorded in OUT, recomputed from its recipe and overrides."""
    try:
        saved = json.loads((out / PLAN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise LorakitError(f"{out}: no {PLAN_FILE} (not a pipeline output, or it never started)") from None
    plan = build_plan(saved["recipe"], saved["overrides"], output_dir=str(out), ablate=saved.get("ablate"))
    print(f"{out}: pipeline {saved['recipe']} {' '.join(saved['overrides'])}".rstrip())
    for s in plan.stages:
        state = read_state(plan.stage_dir(s))
        status = stage_status(plan, s)
        extra = f"  {state['seconds']:.0f} s, peak {state['peak_rss_mb']:.0f} MiB" if status == "done" and \
            state.get("seconds") is not None else ""
        print(f"  {s.label:<16} {status:<8}{extra}")
    return 0


# ---------------------------------------------------------------------------------------------------- running
def run_plan(plan: Plan, recipe: str, overrides: list[str], *, from_stage: Optional[str] = None,
             only: Optional[str] = None, ablate: Optional[list[str]] = None) -> None:
    """Run every stage that is not done with a matching fingerprint (and the ones --from/--only name)."""
    plan.out.mkdir(parents=True, exist_ok=True)
    write_json(plan.out / PLAN_FILE, {"recipe": str(Path(plan.source).resolve()), "overrides": list(overrides),
                                      "ablate": ablate, "stages": [{"stage": s.label, "fingerprint": s.fingerprint,
                                                                    "argv": s.argv} for s in plan.stages]})
    first = plan.find(from_stage).index if from_stage else None
    target = plan.find(only).index if only else None
    if plan.eval is not None:
        evaluate_column(plan, "base", None, plan.base, None, plan.base_fingerprint)
    for stage in plan.stages:
        status = stage_status(plan, stage)
        forced = (first is not None and stage.index >= first) or stage.index == target
        if target is not None and stage.index < target and status != "done":
            raise LorakitError(f"--only {only}: stage {stage.label} before it is {status}; run the pipeline up to it "
                               "first")
        if target is not None and stage.index > target:
            break
        if status == "done" and not forced:
            print(f"lorakit pipeline: {stage.label}: done, fingerprint {stage.fingerprint} matches; skipped",
                  flush=True)
        else:
            if status == "stale":
                print(f"lorakit pipeline: {stage.label}: config or inputs changed; rerunning it", flush=True)
            run_stage(plan, stage, resume=status == "partial" and not forced)
        if plan.eval is not None and (plan.eval.after_each != (stage.name == "eval")):
            evaluate_stage(plan, stage)  # after each stage, or only at the eval stage (then on the final model)


def run_stage(plan: Plan, stage: Stage, resume: bool) -> None:
    """One stage: its own command in a child process (resumed when a killed attempt left a checkpoint), then the
    intermediate merged base when later stages train on it; stage.json records fingerprint, time and peak memory."""
    d = plan.stage_dir(stage)
    if not resume and d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    started = read_state(d) if resume else {}
    seconds, peak = started.get("seconds_so_far", 0.0), started.get("peak_rss_mb_so_far", 0.0)
    write_json(d / STATE, {"fingerprint": stage.fingerprint, "status": "running", "seconds_so_far": seconds,
                           "peak_rss_mb_so_far": peak, "argv": stage.argv})
    print(f"lorakit pipeline: {stage.label}: {'resuming' if resume else 'running'} lorakit {' '.join(stage.argv)}",
          flush=True)
    t0 = time.time()
    if stage.argv:
        if not (stage.name in TRAINING and is_finished(d)):
            argv = list(stage.argv)
            if stage.name in ("extend-vocab", "merge"):
                argv.append("--force")  # these write atomically: an earlier attempt left nothing half-done to keep
            elif resume:
                argv.append("resume=true")
            peak = max(peak, run_command(argv, stage.label))
        if stage.merged and not is_finished(Path(stage.merged)):
            peak = max(peak, run_command(["merge", "--adapter", str(d), "--model", stage.model, "--output",
                                          stage.merged, "--dtype", "fp32", "--force"], f"{stage.label} (merge)"))
    seconds += time.time() - t0
    write_json(d / STATE, {"fingerprint": stage.fingerprint, "status": "done", "seconds": round(seconds, 1),
                           "peak_rss_mb": round(peak, 1), "argv": stage.argv, "inputs": stage.inputs,
                           "resolved": stage.resolved})
    print(f"lorakit pipeline: {stage.label}: done in {seconds:.0f} s (peak {peak:.0f} MiB)", flush=True)


def _own_group_dying_with_parent() -> None:
    """In the child: its own process group, so a terminal's Ctrl-C reaches the pipeline only (which passes it on
    once); and killed when the pipeline process dies (kill -9 of the pipeline stops its stage too)."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: a killed pipeline leaves its stage running to the end


def run_command(argv: list[str], label: str) -> float:
    """Run `lorakit ARGV` in a child process; return its peak resident memory in MiB, or raise naming the stage.
    SIGINT/SIGTERM to the pipeline go to the stage once, which stops at its next step boundary with a checkpoint (a
    rerun of the pipeline resumes from it); a second signal kills the stage at once."""
    proc = subprocess.Popen([sys.executable, "-m", "lora_kit.cli", *argv], preexec_fn=_own_group_dying_with_parent)
    stopped: list[int] = []

    def forward(signum, frame):
        if stopped:
            proc.kill()
        else:
            stopped.append(signum)
            proc.send_signal(signum)

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    for s, h in old.items():
        if h is not signal.SIG_IGN:
            signal.signal(s, forward)
    try:
        _, status, usage = os.wait4(proc.pid, 0)  # retried after each handled signal (PEP 475)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if stopped:
        print(f"lorakit pipeline: {label}: stopped by {NAMES[stopped[0]]} (lorakit {argv[0]} exited with "
              f"{proc.returncode}); run the same command again to continue from its checkpoint", file=sys.stderr,
              flush=True)
        raise Interrupted(stopped[0])
    if proc.returncode != 0:
        raise LorakitError(f"stage {label} failed (lorakit {argv[0]} exited with {proc.returncode}; its error is "
                           "above); fix it and run the same command again to continue from there")
    return usage.ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate_stage(plan: Plan, stage: Stage) -> None:
    """The suite's column for the model a stage produced. rm trains no policy and gets none; an adapter stage right
    before `merge` gets none either: the merge's column measures the same weights (folded in and verified). The eval
    stage measures the final model as the column of the stage that produced it (one cache, after_each or not)."""
    if stage.name == "eval":
        producers = [s for s in plan.stages[: stage.index - 1] if s.name not in ("rm", "eval")]
        if producers:
            stage = producers[-1]
        else:
            return
    else:
        after = plan.stages[stage.index] if stage.index < len(plan.stages) else None
        if stage.name == "rm" or (stage.name in ADAPTER_STAGES and after is not None and after.name == "merge"):
            return
    if stage.name in ("extend-vocab", "merge"):
        model, adapter = str(plan.stage_dir(stage)), None
    else:
        model, adapter = stage.model, str(plan.stage_dir(stage))
    evaluate_column(plan, stage.label, stage, model, adapter, stage.fingerprint)


def evaluate_column(plan: Plan, name: str, stage: Optional[Stage], model: str, adapter: Optional[str],
                    model_fp: str) -> dict:
    """Run the evaluation suite on one model (cached in its stage directory, or OUT/0-base for the base)."""
    d = plan.stage_dir(stage) if stage else plan.out / "0-base"
    key = eval_fingerprint(model_fp, plan.eval)
    path = d / EVAL_FILE
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("fingerprint") == key:
            return cached["result"]
    except (OSError, ValueError, KeyError):
        pass
    print(f"lorakit pipeline: evaluating {name} ({model}{' + ' + adapter if adapter else ''})", flush=True)
    t0 = time.time()
    result = run_suite([(name, model, adapter)], plan.eval.suite, limit=plan.eval.limit,
                       cmmlu=plan.eval.cmmlu or None, batch_size=plan.eval.batch_size)
    write_json(path, {"fingerprint": key, "seconds": round(time.time() - t0, 1), "result": result})
    return result
