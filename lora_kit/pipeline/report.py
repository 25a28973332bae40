"""The pipeline's report: OUT/report.md and a self-contained OUT/report.html (plots inline as base64 PNG, no network)
with the evaluation table (base model first), loss curves of every stage, metrics per stage, time and peak memory.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from lora_kit.evaluate.suite import markdown_table
from lora_kit.rundir import write_text

matplotlib.use("Agg")
CURVES = ("loss", "eval_loss")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def combined_result(plan, branches=()) -> dict:
    """One suite result with a column per evaluated model: the base, each stage, and each ablation branch's last."""
    columns, metrics, counts = [], {}, {}
    dirs = [plan.out / "0-base", *[plan.stage_dir(s) for s in plan.stages]]
    named = [(d, None) for d in dirs]
    for stage, branch in branches:
        last = [branch.stage_dir(s) for s in branch.stages if (branch.stage_dir(s) / "eval.json").is_file()]
        if last:
            named.append((last[-1], f"without {stage}"))
    for d, rename in named:
        result = _json(d / "eval.json").get("result")
        if not result:
            continue
        for col in result.get("columns", []):
            name = rename or col
            if name in columns:
                continue
            columns.append(name)
            for metric, values in result.get("metrics", {}).items():
                if col in values:
                    metrics.setdefault(metric, {})[name] = values[col]
        for metric, n in result.get("counts", {}).items():  # items measured per metric (the same limit everywhere)
            counts.setdefault(metric, n)
    return {"columns": columns, "metrics": metrics, "counts": counts}


def stage_rows(plan) -> list[dict]:
    """Per stage: status, fingerprint, seconds, peak memory (from stage.json), evaluation seconds."""
    rows = []
    for s in plan.stages:
        state = _json(plan.stage_dir(s) / "stage.json")
        rows.append({"stage": s.label, "status": state.get("status", "pending"), "fingerprint": s.fingerprint,
                     "seconds": state.get("seconds"), "peak_rss_mb": state.get("peak_rss_mb"),
                     "eval_seconds": _json(plan.stage_dir(s) / "eval.json").get("seconds")})
    return rows


def loss_curves(plan) -> dict[str, dict[str, list]]:
    """stage label -> metric -> [(step, value)] from each stage's metrics.jsonl."""
    out = {}
    for s in plan.stages:
        path = plan.stage_dir(s) / "metrics.jsonl"
        if not path.is_file():
            continue
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in CURVES}
        series = {k: v for k, v in series.items() if v}
        if series:
            out[s.label] = series
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_losses(curves: dict) -> bytes | None:
    """One panel per stage: its training (and held-out) loss against steps, as PNG bytes."""
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), squeeze=False)
    for ax, (label, series) in zip(axes[0], curves.items()):
        for key, pts in series.items():
            ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 30 else None)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def plot_metrics(result: dict) -> bytes | None:
    """One panel per metric: its value for each column in order (base first), as PNG bytes."""
    metrics = {m: v for m, v in result["metrics"].items() if any(isinstance(x, (int, float)) for x in v.values())}
    if not metrics:
        return None
    cols = min(3, len(metrics))
    nrows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3 * nrows), squeeze=False)
    for ax, (metric, values) in zip(axes.flat, metrics.items()):
        names = [c for c in result["columns"] if isinstance(values.get(c), (int, float))]
        ax.plot(range(len(names)), [values[c] for c in names], marker="o")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def plot_costs(rows: list[dict]) -> bytes | None:
    """Time and peak resident memory per stage as two bar charts, PNG bytes."""
    rows = [r for r in rows if r["seconds"] is not None]
    if not rows:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    names = [r["stage"] for r in rows]
    a.bar(names, [r["seconds"] / 60 for r in rows])
    a.set_title("time per stage (minutes)", fontsize=9)
    b.bar(names, [r["peak_rss_mb"] or 0 for r in rows], color="tab:orange")
    b.set_title("peak resident memory per stage (MiB)", fontsize=9)
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def _fmt(v, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def stage_table(rows: list[dict]) -> str:
    """The stages as a markdown table: status, fingerprint, time, peak memory, evaluation time."""
    lines = ["| stage | status | fingerprint | time (s) | peak memory (MiB) | eval time (s) |",
             "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['status']} | `{r['fingerprint']}` | {_fmt(r['seconds'])} | "
              f"{_fmt(r['peak_rss_mb'])} | {_fmt(r['eval_seconds'])} |" for r in rows]
    return "\n".join(lines)


def _md_to_html_table(md: str) -> str:
    rows = [l.strip().strip("|").split("|") for l in md.strip().splitlines() if l.strip().startswith("|")]
    rows = [r for r in rows if not all(set(c.strip()) <= set("-: ") for c in r)]
    if not rows:
        return f"<pre>{html.escape(md)}</pre>"
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip().strip('`'))}</td>" for c in r) + "</tr>"
                   for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(plan, branches=()) -> str:
    """Write OUT/report.md (+ PNGs beside it) and OUT/report.html; return the evaluation table (markdown)."""
    result = combined_result(plan, branches)
    table = markdown_table(result) if result["columns"] else "(no evaluation: the pipeline has no eval stage)"
    rows = stage_rows(plan)
    plots = {"losses": plot_losses(loss_curves(plan)), "metrics": plot_metrics(result), "costs": plot_costs(rows)}
    titles = {"losses": "Loss curves of every stage", "metrics": "Metrics per stage", "costs": "Time and peak memory"}
    md = [f"# lorakit pipeline report: {plan.out.name}", "", f"Recipe: `{plan.source}`; base model: `{plan.base}`.", "",
          "## Evaluation (held-out data; base model first)", "", table, "", "## Stages", "", stage_table(rows), ""]
    body = [f"<h1>lorakit pipeline report: {html.escape(plan.out.name)}</h1>",
            f"<p>Recipe: <code>{html.escape(plan.source)}</code>; "
            f"base model: <code>{html.escape(plan.base)}</code>.</p>",
            "<h2>Evaluation (held-out data; base model first)</h2>", _md_to_html_table(table),
            "<h2>Stages</h2>", _md_to_html_table(stage_table(rows))]
    for key, png in plots.items():
        if png is None:
            continue
        (plan.out / f"report-{key}.png").write_bytes(png)
        md += [f"## {titles[key]}", "", f"![{titles[key]}](report-{key}.png)", ""]
        body += [f"<h2>{titles[key]}</h2>",
                 f'<img alt="{titles[key]}" src="data:image/png;base64,{base64.b64encode(png).decode()}">']
    write_text(plan.out / "report.md", "\n".join(md))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    write_text(plan.out / "report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>lorakit pipeline "
               f"report</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    return table
