"""Hostile pickles: an adapter whose weights are a pickled adapter_model.bin, and a checkpoint whose optimizer,
scheduler, RNG or PPO state file is a pickle that would create a marker file if unpickled. Every command that reads
an adapter (chat, eval, merge, svd, serve, and the training stages that start from one) or resumes a checkpoint
refuses it in one line naming the file, with no traceback, and the payload never runs.
"""
from __future__ import annotations

import builtins
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_kit.cli import main
from lora_kit.errors import LorakitError


class Payload:
    """Unpickled, it opens (creates) the marker file (pickled as io.open): a real one would call os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def hostile(path: Path, marker: Path, zipped: bool = True) -> Path:
    """Write a payload to `path`: through torch.save (a zip, as the real files are) or as a bare pickle."""
    if zipped:
        torch.save({"state": Payload(marker), "param_groups": []}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    return path


def one_error_line(capsys, command: str, names: Path) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"lorakit {command}: error: {names}"), err[-3000:]
    return line


@pytest.fixture
def pickled_adapter(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """(adapter directory whose weights are a pickled adapter_model.bin holding the payload, marker)."""
    from merge_helpers import make_adapter

    ad = make_adapter(tiny_model_dir, tmp_path / "ad")
    weights = load_file(ad / "adapter_model.safetensors")
    (ad / "adapter_model.safetensors").unlink()
    marker = tmp_path / "executed"
    torch.save({**weights, "payload": Payload(marker)}, ad / "adapter_model.bin")
    return ad, marker


@pytest.mark.parametrize("command", ["chat", "eval", "merge", "svd"])
def test_pickled_adapter_is_refused_in_one_line(command, pickled_adapter, tiny_model_dir, tmp_path, capsys):
    ad, marker = pickled_adapter
    argv = {"chat": ["chat", "--adapter", ad, "--model", tiny_model_dir, "--prompt", "你好", "--max-new-tokens", "2"],
            "eval": ["eval", "--adapter", ad, "--model", tiny_model_dir, "--limit", "2"],
            "merge": ["merge", "--adapter", ad, "--output", tmp_path / "merged"],
            "svd": ["svd", "--adapter", ad, "--rank", "2", "--output", tmp_path / "svd"]}[command]
    assert main([str(a) for a in argv]) == 2
    line = one_error_line(capsys, command, ad / "adapter_model.bin")
    assert "pickled adapter weights refused" in line
    assert not marker.exists()


def test_serve_refuses_a_pickled_adapter(pickled_adapter, tiny_model_dir):
    from lora_kit.serve.engine import load_models

    ad, marker = pickled_adapter
    with pytest.raises(LorakitError, match=r"adapter_model\.bin: pickled adapter weights refused"):
        load_models(str(tiny_model_dir), {"evil": str(ad)}, dtype="fp32")
    assert not marker.exists()


def test_training_from_a_pickled_adapter_is_refused(pickled_adapter, tiny_model_dir, tmp_path, capsys):
    ad, marker = pickled_adapter
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"instruction": "写一条评价{i}"}}\n' for i in range(4)), encoding="utf-8")
    assert main(["ppo", f"model={tiny_model_dir}", f"data={prompts}", f"output_dir={tmp_path / 'o'}",
                 f"sft_adapter={ad}", "reward_fn=ppo_rewards:de_share", "max_steps=1", "batch_size=2",
                 "mini_batch_size=2", "dtype=fp32"]) == 2
    one_error_line(capsys, "ppo", ad / "adapter_model.bin")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- checkpoints
def sft(model: Path, out: Path, *extra) -> list[str]:
    return ["sft", f"model={model}", "data=zh_sft_mix", f"output_dir={out}", "max_samples=16", "cutoff_len=96",
            "batch_size=2", "max_steps=2", "save_steps=1", "logging_steps=1", "dtype=fp32", *extra]


@pytest.fixture(scope="module")
def unfinished_sft(tiny_model_dir, tmp_path_factory) -> Path:
    """An sft run with checkpoints 1 and 2 and no run.json: what resume=true continues."""
    out = tmp_path_factory.mktemp("sft") / "o"
    assert main(sft(tiny_model_dir, out)) == 0
    (out / "run.json").unlink()
    return out


@pytest.mark.parametrize("name,zipped", [("rng_state.pth", False), ("optimizer.pt", True), ("scheduler.pt", True)])
def test_hostile_trainer_checkpoint_file_is_refused_on_resume(name, zipped, unfinished_sft, tiny_model_dir, tmp_path,
                                                              capsys):
    out = tmp_path / "o"
    shutil.copytree(unfinished_sft, out)
    marker = tmp_path / "executed"
    bad = hostile(out / "checkpoints" / "checkpoint-2" / name, marker, zipped)
    capsys.readouterr()
    assert main(sft(tiny_model_dir, out, "resume=true")) == 2
    line = one_error_line(capsys, "sft", bad)
    assert "weights_only" in line and ("asks for io.open" in line or not zipped)
    assert not marker.exists()
    assert not (out / "run.json").exists()


def test_hostile_ppo_checkpoint_state_is_refused_on_resume(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"instruction": "写一条评价{i}"}}\n' for i in range(4)), encoding="utf-8")
    out = tmp_path / "o"
    argv = ["ppo", f"model={tiny_model_dir}", f"data={prompts}", f"output_dir={out}", "reward_fn=ppo_rewards:de_share",
            "max_steps=2", "save_steps=1", "batch_size=2", "mini_batch_size=2", "max_new_tokens=4", "dtype=fp32",
            "eval_fraction=0", "lora.r=4"]
    assert main(argv) == 0
    (out / "run.json").unlink()
    marker = tmp_path / "executed"
    bad = hostile(out / "checkpoints" / "checkpoint-1" / "state.pt", marker)
    capsys.readouterr()
    assert main(argv + ["resume=true"]) == 2
    one_error_line(capsys, "ppo", bad)
    assert not marker.exists()


def test_a_plain_checkpoint_still_resumes(unfinished_sft, tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(unfinished_sft, out)
    assert main(sft(tiny_model_dir, out, "resume=true")) == 0
    assert (out / "run.json").is_file()
