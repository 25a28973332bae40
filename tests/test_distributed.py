"""Two CPU processes (gloo) through the launchers users run: `lorakit sft --nproc 2` (torchrun) and `accelerate launch`
with the bundled DDP config. A 2-process run with per-device batch 2 ends with the adapter of 1 process with batch 4,
resumes from its checkpoint at the same or another world size, and only rank 0 writes files.

Tolerance: DDP all-reduces the two ranks' gradients (each the sum over its own rows, scaled by the token count of the
whole global batch) while one process sums the same rows in one backward pass. The float32 sums are added in a different
order, so gradients agree to ~1e-7 relative, not bit for bit; after four AdamW steps (lr 1e-2) adapters differ by ~1e-6
(see assert_same_adapter for the one kind of entry that can differ more), and losses by ~1e-7.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lora_kit.recipe import load_config
from lora_kit.stages import sft

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Installed into every process through PYTHONPATH: ranks other than 0 log each file they create, change or delete.
AUDIT = r'''
import os, sys
_rank, _log = os.environ.get("RANK"), os.environ.get("LORAKIT_AUDIT_LOG")
if _log and _rank not in (None, "0"):
    _fd = os.open(f"{_log}.rank{_rank}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        path = None
        if event == "open":
            p, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    mode is None and isinstance(flags, int) and flags & _W):
                path = p
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.chmod"):
            path = args[0]
        elif event in ("os.rename", "os.replace", "shutil.copyfile", "shutil.move"):
            path = args[1]
        if isinstance(path, (str, bytes, os.PathLike)):
            os.write(_fd, f"{event}\t{os.path.abspath(os.fsdecode(path))}\n".encode())

    sys.addaudithook(_hook)
'''

OVERRIDES = ["data=zh_sft_mix", "max_samples=32", "cutoff_len=128", "packing=false", "lora.dropout=0", "dtype=fp32",
             "learning_rate=1e-2", "warmup_ratio=0", "max_steps=4", "save_steps=2", "logging_steps=1", "seed=7"]


def overrides(model_dir, out, batch, *extra):
    return [f"model={model_dir}", f"output_dir={out}", f"batch_size={batch}", *OVERRIDES, *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit")
    (audit / "sitecustomize.py").write_text(AUDIT)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(audit), os.environ.get("PYTHONPATH", "")]),
                LORAKIT_AUDIT_LOG=str(audit / "writes"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run_cli(args, env, timeout=300):
    out = subprocess.run([sys.executable, "-m", "lora_kit.cli", *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def adapter(out: Path) -> dict:
    return load_file(out / "adapter_model.safetensors")


def assert_same_adapter(a: dict, b: dict, close=1e-5, entry=1e-3):
    """All but 0.1% of entries within `close`; every entry within `entry`. AdamW divides by sqrt(v): an entry whose
    gradient is at rounding level (~1e-9) moves by up to +-lr whatever its sign, so a lone entry can differ by more
    than the rest (seen: 6e-5 in one of 17k entries, all others < 2e-6). 1e-3 is a tenth of one step at lr 1e-2."""
    assert a.keys() == b.keys()
    far = total = 0
    for k in a:
        diff = (a[k] - b[k]).abs()
        assert diff.max() <= entry, (k, float(diff.max()))
        far += int((diff > close).sum())
        total += diff.numel()
    assert far <= total // 1000, f"{far} of {total} entries differ by more than {close}"


def rank1_writes(env, root: Path) -> list[str]:
    log = Path(env["LORAKIT_AUDIT_LOG"] + ".rank1")
    root = str(root.resolve())
    lines = log.read_text().splitlines() if log.is_file() else []
    return [l for l in lines if l.split("\t")[1].startswith(root)]


@pytest.fixture(scope="module")
def two_proc(tiny_model_dir, tmp_path_factory, env):
    """`lorakit sft --nproc 2`, per-device batch 2 (global batch 4)."""
    out = tmp_path_factory.mktemp("dist") / "two"
    res = run_cli(["sft", "--nproc", "2", *overrides(tiny_model_dir, out, 2)], env)
    return out, res


def test_two_processes_match_one_process_with_the_global_batch(two_proc, tiny_model_dir, tmp_path):
    out, res = two_proc
    assert "torch.distributed.run" in res.stdout  # went through the launcher
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert {p.name for p in (out / "checkpoints" / "checkpoint-4").glob("rng_state_*.pth")} == {
        "rng_state_0.pth", "rng_state_1.pth"}  # really two ranks
    one = sft.run(load_config(sft.Config, "alpaca_zh", overrides(tiny_model_dir, tmp_path / "one", 4)))
    a, b = adapter(out), adapter(one)
    assert any(t.abs().max() > 1e-3 for k, t in a.items() if "lora_B" in k)  # training moved B away from zero
    assert_same_adapter(a, b)
    loss = lambda d: [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert loss(out) == pytest.approx(loss(one), rel=1e-4)


def test_only_rank_0_writes_files(two_proc, env):
    out, _ = two_proc
    writes = rank1_writes(env, out)
    # The one exception is the trainer's own: each rank saves its RNG state into the checkpoint (for an exact resume).
    allowed = lambda l: l.split("\t")[0] == "os.mkdir" and "/checkpoints/checkpoint-" in l
    assert [l for l in writes if not allowed(l)] == []
    assert {p.name for p in out.iterdir()} >= {"adapter_model.safetensors", "run.json", "metrics.jsonl", "loss.png"}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines if '"loss"' in l] == [1, 2, 3, 4]  # one writer: no duplicate rows


def interrupted_copy(src: Path, dst: Path) -> Path:
    """`src` as if killed after step 2: only checkpoint-2, no final adapter or run.json, metrics up to step 2."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "checkpoint-4")
    for name in ("run.json", "adapter_model.safetensors", "adapter_config.json", "loss.png"):
        (dst / name).unlink()
    return dst


def test_two_process_run_resumes_from_its_checkpoint(two_proc, tiny_model_dir, tmp_path, env):
    out, _ = two_proc
    part = interrupted_copy(out, tmp_path / "part")
    run_cli(["sft", "--nproc", "2", *overrides(tiny_model_dir, part, 2, "resume=true")], env)
    assert_same_adapter(adapter(part), adapter(out))
    assert [p.name for p in sorted((part / "checkpoints").iterdir())] == ["checkpoint-2", "checkpoint-4"]
    assert [l for l in rank1_writes(env, part) if "/checkpoints/checkpoint-" not in l] == []


def test_resume_at_another_world_size(two_proc, tiny_model_dir, tmp_path):
    """A 2-process checkpoint continued by 1 process with the same global batch: LoRA weights, AdamW state, scheduler
    and data position carry over (the per-rank RNG states are not needed: no dropout, the sampler is seeded)."""
    out, _ = two_proc
    part = interrupted_copy(out, tmp_path / "part")
    sft.run(load_config(sft.Config, "alpaca_zh", overrides(tiny_model_dir, part, 4, "resume=true")))
    assert_same_adapter(adapter(part), adapter(out))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_with_the_bundled_ddp_config(two_proc, tiny_model_dir, tmp_path, env):
    """What fails on CPU (`accelerate launch --cpu --num_processes 2` starts ONE process: accelerate's CPU path
    expects mpirun) works with the DDP config: MULTI_GPU goes through torchrun, and the Trainer picks gloo on CPU."""
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(CONFIGS / "accelerate" / "ddp.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "lora_kit.cli", "sft",
           *overrides(tiny_model_dir, out, 2)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (out / "checkpoints" / "checkpoint-4" / "rng_state_1.pth").is_file()
    assert_same_adapter(adapter(out), adapter(two_proc[0]))


def test_launcher_strips_nproc_and_propagates_the_exit_code(tiny_model_dir, tmp_path, env):
    from lora_kit.training.launch import strip_nproc, torchrun_command

    assert strip_nproc(["sft", "--nproc", "2", "a=1", "--nproc=3", "--dry-run"]) == ["sft", "a=1", "--dry-run"]
    cmd = torchrun_command(2, ["sft", "--nproc", "2", "x=1"])
    assert cmd[-4:] == ["-m", "lora_kit.cli", "sft", "x=1"] and "--nproc_per_node" in cmd
    # A user error in the workers (unknown data file) comes back as a failing exit code, not a hang.
    res = subprocess.run([sys.executable, "-m", "lora_kit.cli", "sft", "--nproc", "2",
                          *overrides(tiny_model_dir, tmp_path / "bad", 2, "data=/nonexistent.jsonl")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "nonexistent" in res.stderr


def in_own_group_with_sigint() -> None:
    """The launcher as a terminal's foreground job: its own process group, Ctrl-C not ignored."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", ["sigterm", "ctrl-c"])
def test_a_stop_signal_to_the_launcher_saves_a_checkpoint_on_every_rank_and_resume_matches(tiny_model_dir, tmp_path,
                                                                                           env, sig):
    """SIGTERM to `lorakit sft --nproc 2` (a scheduler), or SIGINT to its whole process group (a terminal's Ctrl-C,
    which would reach the workers twice if torchrun shared their group): both ranks stop at one step boundary with
    a checkpoint, the launcher exits 143 / 130, and resume=true ends where an uninterrupted 2-process run ends."""
    signum = signal.SIGTERM if sig == "sigterm" else signal.SIGINT
    extra = ["max_steps=12", "save_steps=100"]
    part, full = tmp_path / "part", tmp_path / "full"
    proc = subprocess.Popen([sys.executable, "-m", "lora_kit.cli", "sft", "--nproc", "2",
                             *overrides(tiny_model_dir, part, 2, *extra)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, errors="replace", preexec_fn=in_own_group_with_sigint)
    try:
        metrics, deadline = part / "metrics.jsonl", time.time() + 300
        while proc.poll() is None and time.time() < deadline and not (
                metrics.is_file() and '"loss"' in metrics.read_text()):
            time.sleep(0.02)
        running = proc.poll() is None
        os.kill(proc.pid, signum) if signum == signal.SIGTERM else os.killpg(proc.pid, signum)
        err = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert running, f"the run ended before the signal: {err[-3000:]}"
    assert proc.returncode == 128 + signum, err[-3000:]
    assert not (part / "run.json").exists()
    ckpts = sorted((part / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1, err[-3000:]
    step = json.loads((ckpts[0] / "trainer_state.json").read_text())["global_step"]
    assert 1 <= step < 12 and {p.name for p in ckpts[0].glob("rng_state_*.pth")} == {"rng_state_0.pth",
                                                                                     "rng_state_1.pth"}
    assert f"lorakit sft: stopped by {signal.Signals(signum).name}; checkpoint saved: {ckpts[0]}" in err, err[-3000:]
    assert err.count("received: stopping after this step") == 1  # rank 0 says it once: one signal per worker

    run_cli(["sft", "--nproc", "2", *overrides(tiny_model_dir, part, 2, *extra, "resume=true")], env)
    run_cli(["sft", "--nproc", "2", *overrides(tiny_model_dir, full, 2, *extra)], env)
    assert_same_adapter(adapter(part), adapter(full))
