"""`lorakit dpo` on the tiny model: the chosen-vs-rejected reward margin grows; adapter at the root of output_dir."""
import json

from conftest import write_jsonl
from lora_kit.cli import main
from test_rm import synthetic_pairs


def test_dpo_raises_margin(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(120))
    out = tmp_path / "dpo"
    code = main(["dpo", f"model={tiny_model_dir}", f"data={data}", f"output_dir={out}", "max_steps=20",
                 "learning_rate=5e-3", "batch_size=8", "save_steps=20", "logging_steps=5", "eval_fraction=0.2",
                 "dtype=fp32", "warmup_ratio=0", "beta=0.1"])
    assert code == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    margins = [r["rewards/margins"] for r in rows if "rewards/margins" in r]
    assert margins[-1] > margins[0] and margins[-1] > 0.1, margins
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "dpo" and run["held_out_margin"] > 0.1 and run["held_out_accuracy"] > 0.8
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(out).task_type == "CAUSAL_LM"
