"""`lorakit ui`'s JSON API without a browser: paths stay inside the runs directory (run names, metrics, uploaded
recipes), runs get their status and progress from their files, eval results come back as figures side by side."""
from __future__ import annotations

import json
import os
import time

import pytest

pytest.importorskip("fastapi", reason="the UI needs the serve extra (fastapi, uvicorn, httpx)")
from fastapi.testclient import TestClient  # noqa: E402

from lora_kit.serve.ui import create_ui  # noqa: E402


@pytest.fixture
def ui(tmp_path):
    root = tmp_path / "runs"
    (root / "done").mkdir(parents=True)
    (root / "done" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - s / 10}) + "\n"
                                                         for s in (1, 2, 3)) + '{"step": 4, "lo')  # cut by a kill
    (root / "done" / "run.json").write_text(json.dumps({"stage": "sft", "base_model": "m"}))
    (root / "old").mkdir()
    (root / "old" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    hour_ago = time.time() - 3600
    os.utime(root / "old" / "metrics.jsonl", (hour_ago, hour_ago))
    (root / "live").mkdir()
    (root / "live" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    (root / "pipe" / "1-sft").mkdir(parents=True)
    (root / "pipe" / "1-sft" / "run.json").write_text("{}")
    (root / "pipe" / "2-merge").mkdir()
    (root / "eval_a.json").write_text(json.dumps({"task": "sentiment", "accuracy": 0.5, "n": 8}))
    (root / "eval_b.json").write_text(json.dumps({"task": "sentiment", "accuracy": 0.75, "n": 8}))
    (tmp_path / "outside.yaml").write_text("# lorakit sft --recipe x\nmax_steps: 1\n")
    return TestClient(create_ui(root)), root


def test_runs_status_pipeline_and_reports(ui):
    client, root = ui
    runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert runs["done"]["status"] == "finished" and runs["done"]["stage"] == "sft" and runs["done"]["step"] == 3
    assert runs["live"]["status"] == "running" and runs["old"]["status"] == "stopped"
    assert [(s["stage"], s["status"]) for s in runs["pipe"]["pipeline"]] == [("sft", "finished"), ("merge", "pending")]
    assert [r["loss"] for r in client.get("/api/metrics/done").json()["rows"]] == [2.9, 2.8, 2.7]
    figures = {r["name"]: r["figures"]["accuracy"] for r in client.get("/api/reports").json()["reports"]}
    assert figures == {"eval_a.json": 0.5, "eval_b.json": 0.75}


@pytest.mark.parametrize("path", ["/api/metrics/..", "/api/metrics/../../etc", "/api/metrics/%2Fetc",
                                  "/api/recipe/..%2Foutside.yaml", "/api/recipe/%2Fetc%2Fpasswd", "/api/log/..%2Fx"])
def test_paths_stay_inside_the_runs_directory(ui, path):
    client, _ = ui
    r = client.get(path)
    assert r.status_code in (400, 404), r.text
    assert "error" in r.json()


@pytest.mark.parametrize("body", [{"recipe": "alpaca_zh", "name": "../escape"},
                                  {"recipe": "alpaca_zh", "name": "/tmp/x"},
                                  {"recipe": "../outside.yaml", "name": "x"},
                                  {"recipe": "alpaca_zh", "name": "x", "values": {"no_such_key": 1}}])
def test_start_refuses_escapes_and_unknown_keys(ui, body):
    client, root = ui
    r = client.post("/api/start", json=body)
    assert r.status_code == 400 and r.json()["error"]["message"]
    assert not (root / ".lorakit-ui").exists()  # nothing was started
