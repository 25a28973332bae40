"""The real chain on SmolLM2-135M (slow): sft through the CLI, then eval and chat read the adapter's base, tokenizer
and template back from its output directory."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def lorakit(*args):
    r = subprocess.run([sys.executable, "-m", "lora_kit.cli", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_sft_eval_chat_on_smollm2(smollm2_dir, tmp_path):
    out = tmp_path / "sft"
    lorakit("sft", "--recipe", "alpaca_zh", f"output_dir={out}", "max_samples=24", "cutoff_len=128", "batch_size=2",
            "max_steps=2", "save_steps=2", "logging_steps=1")
    run = json.loads((out / "run.json").read_text())
    assert run["base_model"] == str(smollm2_dir)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all(r["loss"] < 10 for r in rows if "loss" in r)
    lorakit("eval", "--adapter", str(out), "--task", "sentiment", "--limit", "4", "--output", str(tmp_path / "e.json"))
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["n"] == 4 and 0 <= result["accuracy"] <= 1 and result["adapter"] == str(out)
    said = lorakit("chat", "--adapter", str(out), "--prompt", "你好", "--max-new-tokens", "8")
    assert said.strip()
