"""What lorakit may do to an output_dir (rundir.RunDir): only ever replace its own output, keep a finished run until
its forced rerun has a result, one writer at a time, and a rerun of a finished run is a no-op unless its recipe
changed. Tiny sft runs (2 steps) on the conftest model."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from lora_kit.cli import main
from test_kill_resume import VOLATILE, subprocess_env


def sft(model, out, *extra) -> list[str]:
    return ["sft", f"model={model}", "data=zh_sft_mix", f"output_dir={out}", "max_samples=32", "cutoff_len=96",
            "batch_size=2", "max_steps=2", "save_steps=2", "logging_steps=1", "dtype=fp32", *extra]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` (hidden ones too) with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if not VOLATILE.search(k)}
            for l in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def finished(tiny_model_dir, tmp_path):
    """A finished 2-step sft run and the bytes of every file in it."""
    out = tmp_path / "run"
    assert main(sft(tiny_model_dir, out)) == 0
    return out, tree(out)


# ---------------------------------------------------------------------------------------------------- 1: foreign
@pytest.mark.parametrize("force", [True, False])
def test_a_directory_lorakit_did_not_write_is_refused_force_or_not(tiny_model_dir, tmp_path, capsys, force):
    user = tmp_path / "mine"
    (user / "checkpoints").mkdir(parents=True)
    (user / "checkpoints" / "important.txt").write_text("the user's")
    (user / "metrics.jsonl").write_text('{"mine": 1}\n')
    (user / "recipe.yaml").write_text("mine: true\n")
    before = tree(user)
    capsys.readouterr()
    assert main(sft(tiny_model_dir, user, *(["force=true"] if force else []))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lorakit sft: error: {user}: not empty") and "not a lorakit" in err
    assert tree(user) == before and sorted(p.name for p in user.iterdir()) == ["checkpoints", "metrics.jsonl",
                                                                               "recipe.yaml"]


def test_a_parent_of_other_work_is_refused(tiny_model_dir, finished, capsys):
    out, _ = finished
    parent = out.parent  # holds the run (and pytest's other files): not itself a run
    assert main(sft(tiny_model_dir, parent, "force=true")) == 2
    assert "not a lorakit output" in capsys.readouterr().err
    assert (out / "run.json").is_file()


def test_force_keeps_a_users_file_inside_a_lorakit_run(tiny_model_dir, finished):
    out, _ = finished
    (out / "checkpoints" / "notes.txt").write_text("mine")
    (out / "my-plot.png").write_bytes(b"mine")
    assert main(sft(tiny_model_dir, out, "force=true", "learning_rate=1e-3")) == 0
    assert (out / "checkpoints" / "notes.txt").read_text() == "mine" and (out / "my-plot.png").read_bytes() == b"mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "notes.txt"]
    assert not (out / ".lorakit-previous").exists() and not (out / ".lorakit.lock").exists()
    assert json.loads((out / "run.json").read_text())["stage"] == "sft"


def test_merge_force_refuses_a_foreign_directory(tiny_untied_model_dir, tmp_path, capsys):
    from merge_helpers import make_adapter

    adapter = make_adapter(tiny_untied_model_dir, tmp_path / "ad", targets=["q_proj"])
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["merge", "--adapter", str(adapter), "--output", str(out), "--force"]) == 2
    assert "not a lorakit output" in capsys.readouterr().err and (out / "keep.txt").read_text() == "x"


# ---------------------------------------------------------------------------------------------------- 2: previous
def _bad_data(tmp_path):
    return [f"data={write_jsonl(tmp_path / 'bad.jsonl', [{'instruction': 'a', 'output': ['b']}])}"]


def _broken_model(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(b"not safetensors")  # fails while loading the weights
    return [f"model={model}"]


@pytest.mark.parametrize("failure", ["bad data", "bad template", "load fails"])
def test_failed_force_rerun_leaves_the_previous_run_byte_for_byte(tiny_model_dir, finished, tmp_path, failure):
    out, before = finished
    extra = {"bad data": lambda: _bad_data(tmp_path), "bad template": lambda: ["template=no-such-template"],
             "load fails": lambda: _broken_model(tmp_path, tiny_model_dir)}[failure]()
    try:
        code = main(sft(tiny_model_dir, out, "force=true", *extra))
    except Exception:  # a library's own error while loading: still after the old run was set aside
        code = None
    assert code != 0
    assert tree(out) == before


def test_kill_during_a_forced_rerun_then_the_previous_run_is_back(tiny_model_dir, finished, capsys):
    out, before = finished
    cmd = [sys.executable, "-m", "lora_kit.cli", *sft(tiny_model_dir, out, "force=true", "learning_rate=1e-3")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    try:
        deadline = time.time() + 120
        while not (out / ".lorakit-previous").is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # after the old run was set aside, before the new one has a checkpoint
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "run.json").exists()
    capsys.readouterr()
    assert main(sft(tiny_model_dir, out, "resume=true")) == 0  # the next start puts the finished run back
    assert "already complete" in capsys.readouterr().out
    assert tree(out) == before


@pytest.mark.parametrize("limit", [60_000, 100_000])  # fails writing the checkpoint's adapter / its optimizer state
def test_disk_full_during_a_forced_rerun_leaves_the_previous_run_byte_for_byte(tiny_model_dir, finished, limit):
    """A full disk, as the process sees it: RLIMIT_FSIZE makes every write past `limit` bytes fail with EFBIG (Python
    ignores SIGXFSZ), part-way through the rerun's first checkpoint. One line, exit 1, the old run as it was."""
    import resource

    out, before = finished
    cmd = [sys.executable, "-m", "lora_kit.cli", *sft(tiny_model_dir, out, "force=true")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(),
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert max(len(v) for k, v in before.items() if k.startswith("checkpoints/")) > limit  # something must not fit
    assert proc.returncode == 1
    line = next(l for l in proc.stderr.splitlines() if "lorakit sft: error: " in l)
    assert line.startswith("lorakit sft: error: could not write ") and str(out) in line, line  # names where
    assert "Traceback" not in proc.stderr
    assert tree(out) == before


# ---------------------------------------------------------------------------------------------------- 3: one writer
def test_second_writer_fails_at_once_naming_the_first(tiny_model_dir, tmp_path, capsys):
    out, alone = tmp_path / "shared", tmp_path / "alone"
    args = lambda o: sft(tiny_model_dir, o, "max_steps=24", "save_steps=8")
    first = subprocess.Popen([sys.executable, "-m", "lora_kit.cli", *args(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=subprocess_env())
    lock = out / ".lorakit.lock"
    try:
        deadline = time.time() + 120
        while first.poll() is None and time.time() < deadline and not (lock.is_file() and lock.read_text()):
            time.sleep(0.01)
        capsys.readouterr()
        assert main(args(out)) == 2
        err = capsys.readouterr().err
        running = first.poll() is None
    finally:
        _, first_err = first.communicate(timeout=300)
    assert running, "the first run ended before the second started: nothing was tested"
    assert err.count("\n") == 1 and f"{out}: another lorakit run is writing here (pid {first.pid} on host" in err
    assert first.returncode == 0, first_err.decode()[-1500:]
    assert main(args(alone)) == 0
    a, b = load_file(out / "adapter_model.safetensors"), load_file(alone / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rows(out) == rows(alone)  # every row once
    assert not lock.exists()


def test_lock_of_a_run_that_ended_in_this_process_is_no_obstacle(tiny_model_dir, tmp_path):
    from lora_kit.rundir import RunDir

    out = tmp_path / "o"
    RunDir.claim(out, force=False, resume=False)  # held, never closed (as a run called outside the CLI)
    assert main(sft(tiny_model_dir, out)) == 0


# ---------------------------------------------------------------------------------------------------- 5: reruns
def test_resume_of_a_finished_run_is_a_noop_unless_its_recipe_changed(tiny_model_dir, finished, capsys):
    out, before = finished
    capsys.readouterr()
    assert main(sft(tiny_model_dir, out, "resume=true")) == 0
    assert f"lorakit sft: {out}: already complete" in capsys.readouterr().out
    assert main(sft(tiny_model_dir, out, "resume=true", "logging_steps=2", "report_to=none")) == 0  # same result
    assert tree(out) == before
    assert main(sft(tiny_model_dir, out, "resume=true", "learning_rate=1e-3", "lora.r=4")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "recipe differs in" in err and "learning_rate" in err and "lora.r (8 -> 4)" in err
    assert tree(out) == before
