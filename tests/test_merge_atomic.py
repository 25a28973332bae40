"""`lorakit merge` writes atomically: refused over an existing output without --force, nothing left by a failure."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lora_kit.cli import main
from lora_kit.export import common
from merge_helpers import make_adapter


@pytest.fixture()
def adapter(tiny_untied_model_dir, tmp_path):
    return make_adapter(tiny_untied_model_dir, tmp_path / "ad", targets=["q_proj", "down_proj"])


def leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_existing_output_needs_force(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--output", str(out)]) == 0
    assert main(["merge", "--adapter", str(adapter), "--output", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(adapter), "--output", str(out), "--force"]) == 0
    assert (out / "run.json").exists()
    mine = tmp_path / "mine"  # not written by lorakit: never replaced, --force or not
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    for force in ([], ["--force"]):
        assert main(["merge", "--adapter", str(adapter), "--output", str(mine), *force]) == 2
        assert "not a lorakit output" in capsys.readouterr().err and (mine / "keep.txt").exists()


def test_exception_mid_write_leaves_nothing(adapter, tmp_path, monkeypatch):
    calls = []
    real = common.write_safetensors_stream

    def failing(path, plan, produce):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("disk full (injected)")
        return real(path, plan, produce)

    monkeypatch.setattr("lora_kit.export.merge.write_safetensors_stream", failing)
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="injected"):
        main(["merge", "--adapter", str(adapter), "--output", str(out), "--shard-size", "100KB"])
    assert not out.exists() and leftovers(tmp_path) == []


def test_failed_verification_writes_nothing(adapter, tmp_path, monkeypatch, capsys):
    from lora_kit.export.common import Lora

    monkeypatch.setattr(Lora, "delta", lambda self: (self.B @ self.A * self.scale * 2).float())  # a wrong merge
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--output", str(out)]) == 2
    assert "verification failed" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_killed_merge_leaves_no_complete_looking_output(adapter, tmp_path):
    out = tmp_path / "merged"
    # stall inside verification (after the shards are written), then kill -9 the process
    code = ("import sys, time; import lora_kit.export.merge as m; from lora_kit.cli import main\n"
            "m.verify = lambda *a, **k: (print('WRITTEN', flush=True), time.sleep(60))\n"
            f"sys.exit(main(['merge', '--adapter', {str(adapter)!r}, '--output', {str(out)!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 60
        while time.time() < deadline and "WRITTEN" not in (proc.stdout.readline() or ""):
            pass
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    assert partial and all(not (p / "run.json").exists() for p in partial)  # hidden, and without run.json
