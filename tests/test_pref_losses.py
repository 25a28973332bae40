"""`lorakit dpo loss=...` on the tiny model: IPO, KTO, ORPO and SimPO train only the adapter, learn the synthetic
preference (held-out pairwise accuracy), and KTO's unpaired data is validated with file, line and field."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import write_jsonl
from lora_kit.cli import main
from test_rm import synthetic_pairs


def dpo_args(model, data, out, loss, *extra):
    return ["dpo", f"model={model}", f"data={data}", f"output_dir={out}", f"loss={loss}", "max_steps=12",
            "learning_rate=5e-3", "batch_size=8", "save_steps=100", "logging_steps=4", "eval_fraction=0.2",
            "dtype=fp32", "warmup_ratio=0", "lora.r=4", "lora.dropout=0", *extra]


@pytest.fixture
def base_watch(monkeypatch):
    """Wraps Trainer.train: records which parameters the trainer could update and whether any other changed."""
    seen = {}
    original = transformers.Trainer.train

    def train(self, *a, **kw):
        model = self.model
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        seen["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
        result = original(self, *a, **kw)
        seen["changed_frozen"] = [n for n, p in model.named_parameters() if n in frozen and
                                  not torch.equal(p.detach(), frozen[n])]
        seen["frozen"] = len(frozen)
        return result

    monkeypatch.setattr(transformers.Trainer, "train", train)
    return seen


@pytest.mark.parametrize("loss,extra", [("ipo", ["beta=0.5"]), ("kto", []), ("orpo", ["orpo_lambda=1.0"]),
                                        ("simpo", ["beta=2.0", "gamma=0.5"])])
def test_each_loss_trains_only_the_adapter_and_learns_the_preference(tiny_model_dir, tmp_path, base_watch, loss,
                                                                     extra):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(80))
    out = tmp_path / loss
    assert main(dpo_args(tiny_model_dir, data, out, loss, *extra)) == 0
    assert base_watch["trainable"] and all("lora_" in n for n in base_watch["trainable"]), base_watch["trainable"][:3]
    assert base_watch["frozen"] > 0 and base_watch["changed_frozen"] == []
    saved = load_file(out / "adapter_model.safetensors")
    assert all("lora_" in k for k in saved) and any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    run = json.loads((out / "run.json").read_text())
    assert run["loss"] == loss and run["held_out_pairs"] == 16
    assert run["held_out_pref_accuracy"] >= 0.75, run  # 很好 over 很差, learnt from 64 training pairs


def test_kto_trains_on_unpaired_records(tiny_model_dir, tmp_path):
    rows = []
    for p in synthetic_pairs(60):
        rows.append({"instruction": p["instruction"], "completion": p["chosen"], "label": True})
        rows.append({"instruction": p["instruction"] + "。", "completion": p["rejected"], "label": False})
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    out = tmp_path / "kto"
    assert main(dpo_args(tiny_model_dir, data, out, "kto", "max_steps=4", "eval_fraction=0")) == 0
    assert json.loads((out / "run.json").read_text())["training_rows"] == 120


@pytest.mark.parametrize("record,line_field", [
    ({"instruction": "评价", "completion": "很好", "label": "yes"}, "label' must be true or false, got \"yes\""),
    ({"instruction": "评价", "completion": "很好"}, "label' is missing"),
    ({"instruction": "评价", "completion": "  ", "label": True}, "completion' is empty"),
    ({"instruction": "评价", "label": False}, "completion' is missing"),
])
def test_kto_data_errors_name_file_line_and_field(tiny_model_dir, tmp_path, capsys, record, line_field):
    good = {"instruction": "评价", "completion": "很好", "label": True}
    data = write_jsonl(tmp_path / "kto.jsonl", [good, good, record, good])
    assert main(dpo_args(tiny_model_dir, data, tmp_path / "o", "kto")) == 2
    err = capsys.readouterr().err
    assert f"kto.jsonl:3: field '{line_field}" in err, err


def test_pair_losses_refuse_unpaired_records(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "kto.jsonl", [{"instruction": "评价", "completion": "很好", "label": True}] * 4)
    assert main(dpo_args(tiny_model_dir, data, tmp_path / "o", "simpo")) == 2
    assert "train with loss=kto" in capsys.readouterr().err


def test_data_check_lists_every_unpaired_problem(tmp_path, capsys):
    rows = [{"instruction": "评价", "completion": "很好", "label": True}, {"instruction": "评价", "label": 1},
            {"instruction": "评价", "completion": "很差"}]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    assert main(["data", "check", str(data)]) != 0
    out = capsys.readouterr()
    text = out.out + out.err
    for problem in ("kto.jsonl:2: field 'completion' is missing", "kto.jsonl:2: field 'label' must be true or false",
                    "kto.jsonl:3: field 'label' is missing"):
        assert problem in text, text
