"""`lorakit rm` on the tiny model: learns a synthetic preference; output contract; recipe loads."""
import json
import random

import pytest
import torch

from conftest import write_jsonl
from lora_kit.cli import main

FILL = "这本书内容写得质量包装物流价格客服手机酒店房间早餐服务"


def synthetic_pairs(n: int, seed: int = 0):
    """The preferred answer says 很好 where the other says 很差; everything else is shared filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        filler = "".join(rng.choice(FILL) for _ in range(rng.randint(3, 10)))
        rows.append({"instruction": f"评价一下商品{i}", "input": "", "chosen": filler + "很好",
                     "rejected": filler + "很差"})
    return rows


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rm_learns_synthetic_preference(tiny_model_dir, tmp_path, capsys, dtype):
    """In bf16 the score head is trained as an fp32 master copy over the bf16 base (models._train_in_fp32)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(240))
    out = tmp_path / "rm"
    code = main(["rm", f"model={tiny_model_dir}", f"data={data}", f"output_dir={out}", "max_steps=30",
                 "learning_rate=3e-3", "batch_size=8", "save_steps=30", "logging_steps=10", "eval_fraction=0.2",
                 "lora.r=8", "lora.alpha=16", f"dtype={dtype}", "warmup_ratio=0"])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "rm" and run["held_out_accuracy"] > 0.9
    assert "held-out pairwise accuracy" in capsys.readouterr().out
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in rows) and any("loss" in r for r in rows)
    for name in ("adapter_model.safetensors", "adapter_config.json", "recipe.yaml", "run.json", "loss.png",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    assert any("score" in k for k in saved) and {t.dtype for t in saved.values()} == {torch.float32}


def test_rm_ranked_and_sharegpt_pairs(tmp_path):
    from lora_kit.data.pairs import read_pairs

    ranked = write_jsonl(tmp_path / "r.jsonl", [{"instruction": "q", "responses": ["A", "B", "C", "D"]}])
    pairs = read_pairs(str(ranked))[0]
    assert [(p.chosen, p.rejected) for p in pairs] == [("A", "B"), ("A", "C"), ("A", "D"), ("B", "C"), ("B", "D"),
                                                       ("C", "D")]
    share = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "system", "value": "s"},
                                                                  {"from": "human", "value": "hi"}],
                                                "chosen": {"from": "gpt", "value": "good"},
                                                "rejected": {"from": "gpt", "value": "bad"}}])
    (p,) = read_pairs(str(share))[0]
    assert p.prompt == [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    assert (p.chosen, p.rejected) == ("good", "bad")


@pytest.mark.parametrize("recipe", ["rm_zh", "dpo_zh", "ppo_zh"])
def test_alignment_recipes_load(recipe, capsys):
    assert main([recipe.split("_")[0], "--recipe", recipe, "--print-config"]) == 0
    assert "model: smollm2-135m" in capsys.readouterr().out
