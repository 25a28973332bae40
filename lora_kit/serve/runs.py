"""What `lorakit ui` shows of a runs directory: each run's stage, status, progress and metrics, pipelines' stage status,
and eval/pipeline reports; every path resolved inside the runs directory (names never escape it).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional

from lora_kit.errors import LorakitError
from lora_kit.rundir import read_run

UI_DIR = ".lorakit-ui"  # RUNS/.lorakit-ui/NAME.json|log: what the UI records of a run it started (command, log, exit)
STAGE_DIR = re.compile(r"^(\d+)-([a-z-]+)$")  # a pipeline's OUT/<n>-<stage>/
TQDM = re.compile(r"(\d+)/(\d+) \[[^<\]]*<([0-9:?]+)")  # "12/30 [00:03<00:05, ..." : step, total, remaining
FRESH = 120  # seconds: a run without run.json whose metrics changed this recently counts as running


def inside(root: Path, name: str) -> Path:
    """`root/name` if it stays inside `root` (no `..`, no absolute path, no symlink out), else a LorakitError."""
    root = root.resolve()
    path = (root / name).resolve()
    if not name or Path(name).is_absolute() or (path != root and root not in path.parents):
        raise LorakitError(f"{name!r}: not a path inside the runs directory {root}")
    return path


def metrics(run: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (phases of a pretrain run concatenated; a line cut off by a kill skipped)."""
    files = [run / "metrics.jsonl"] + sorted(run.glob("phase*/metrics.jsonl"))
    rows = []
    for f in files:
        if f.is_file():
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def _is_run(path: Path) -> bool:
    return any((path / n).exists() for n in ("run.json", "metrics.jsonl", "checkpoints", "phase1"))


def _total_steps(run: Path) -> Optional[int]:
    states = sorted(run.glob("**/checkpoints/checkpoint-*/trainer_state.json"))
    for s in reversed(states):
        try:
            return int(json.loads(s.read_text(encoding="utf-8"))["max_steps"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def progress_from_log(log: Path) -> dict:
    """step, total and remaining time from the last progress bar line of a run's log."""
    if not log.is_file():
        return {}
    tail = log.read_bytes()[-4000:].decode("utf-8", "replace")
    found = TQDM.findall(tail.replace("\r", "\n"))
    if not found:
        return {}
    step, total, eta = found[-1]
    return {"step": int(step), "total": int(total), "eta": eta}


def ui_record(root: Path, name: str) -> dict:
    """What the UI recorded when it started run `name` ({} for a run started elsewhere)."""
    path = root / UI_DIR / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def describe_run(root: Path, run: Path, alive: bool) -> dict:
    """One run's row: name (relative to root), stage, status, step of total, ETA, last metrics."""
    info = read_run(run) if (run / "run.json").is_file() else {}
    ui = ui_record(root, str(run.relative_to(root)))
    rows = metrics(run)
    last = {k: v for r in rows for k, v in r.items() if isinstance(v, (int, float))}
    prog = progress_from_log(run / ui["log"]) if ui.get("log") else {}
    touched = max((p.stat().st_mtime for p in run.glob("**/metrics.jsonl")), default=0)
    if info:
        status = "finished"
    elif alive or (not ui and time.time() - touched < FRESH and rows):
        status = "running"
    elif ui.get("stopped"):
        status = "stopped"
    elif ui.get("returncode") not in (None, 0):
        status = "failed"
    else:
        status = "stopped" if rows or (run / "checkpoints").exists() else "pending"
    step = prog.get("step", last.get("step"))
    total = prog.get("total") or info.get("steps") or _total_steps(run) or ui.get("max_steps")
    if status == "finished" and rows:
        step = total = max(r.get("step", 0) for r in rows) if not total else total
    return {"name": str(run.relative_to(root)), "stage": info.get("stage") or ui.get("stage") or "?", "status": status,
            "step": step, "total": total, "eta": prog.get("eta") if status == "running" else None,
            "loss": last.get("loss"), "eval_loss": last.get("eval_loss"), "points": len(rows),
            "started_by_ui": bool(ui), "pipeline": pipeline_stages(run)}


def pipeline_stages(out: Path) -> list[dict]:
    """A pipeline output's stages in order (OUT/<n>-<stage>/) with finished or not; [] for a plain run."""
    found = []
    for d in sorted(p for p in out.iterdir() if p.is_dir() and STAGE_DIR.match(p.name)) if out.is_dir() else []:
        n, stage = STAGE_DIR.match(d.name).groups()
        found.append({"n": int(n), "stage": stage, "dir": d.name,
                      "status": "finished" if (d / "run.json").is_file() else ("started" if any(d.iterdir()) else
                                                                                "pending")})
    return sorted(found, key=lambda s: s["n"])


def list_runs(root: Path, alive: set[str]) -> list[dict]:
    """Every run under `root` (its children, and a pipeline's stage directories below them), newest first."""
    root = root.resolve()
    found = []
    children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    started = {p.stem for p in (root / UI_DIR).glob("*.json")}
    for child in children:
        if pipeline_stages(child):
            found.append(describe_run(root, child, str(child.relative_to(root)) in alive) | {"stage": "pipeline"})
        elif _is_run(child) or child.name in started:
            found.append(describe_run(root, child, child.name in alive))
    for name in sorted(started - {c.name for c in children}):  # started, output directory not created yet
        found.append(describe_run(root, root / name, name in alive))
    when = lambda r: (root / r["name"]).stat().st_mtime if (root / r["name"]).exists() else time.time()
    return sorted(found, key=lambda r: -when(r))


def reports(root: Path) -> list[dict]:
    """Eval results (`lorakit eval --output X.json`, suites' {"metrics": {...}}) and pipeline reports under `root`:
    name, flat numeric figures, and the markdown text of report.md files."""
    root = root.resolve()
    out = []
    for path in sorted(root.glob("**/*.json")):
        rel = path.relative_to(root)
        if any(part.startswith(".") or part == "checkpoints" for part in rel.parts) or path.name in (
                "run.json", "adapter_config.json", "config.json", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json", "special_tokens_map.json", "trainer_state.json", "data_stats.json"):
            continue
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(obj, dict):
            continue
        figures = {k: v for k, v in obj.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for metric, by_column in (obj.get("metrics") or {}).items() if isinstance(obj.get("metrics"), dict) else []:
            if isinstance(by_column, dict):
                figures.update({f"{metric} [{c}]": v for c, v in by_column.items() if isinstance(v, (int, float))})
        if figures and any(k in obj for k in ("task", "bits_per_char", "metrics")):
            label = obj.get("task") or ("bits/char " + str(obj.get("text", ""))[-30:] if "bits_per_char" in obj else "")
            out.append({"name": str(rel), "label": label, "figures": figures})
    for path in sorted(root.glob("**/report.md")):
        out.append({"name": str(path.relative_to(root)), "label": "report", "figures": {},
                    "markdown": path.read_text(encoding="utf-8")[:20000]})
    return out
