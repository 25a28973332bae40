"""`lorakit svd`: exact at full rank, optimal (Eckart–Young) below it, weighted combination of adapters."""
from __future__ import annotations

import json

import torch

from lora_kit.cli import main
from lora_kit.export.common import read_adapter
from merge_helpers import extend_model, make_adapter, peft_logits, probe_ids


def deltas(path):
    return {k: f.delta() for k, f in read_adapter(path).lora.items()}


def test_full_rank_is_exact(tiny_untied_model_dir, tmp_path):
    ad = make_adapter(tiny_untied_model_dir, tmp_path / "ad", r=4, rslora=True)
    out = tmp_path / "svd"
    assert main(["svd", "--adapter", str(ad), "--rank", "4", "--output", str(out)]) == 0
    before, after = deltas(ad), deltas(out)
    assert before.keys() == after.keys() and len(before) == 14
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-5, rtol=0)
    ids = probe_ids(100)
    torch.testing.assert_close(peft_logits(tiny_untied_model_dir, [out], ids),
                               peft_logits(tiny_untied_model_dir, [ad], ids), atol=1e-4, rtol=0)
    report = json.loads((out / "svd_report.json").read_text())
    assert abs(report["overall_energy"] - 1) < 1e-9


def test_lower_rank_error_is_the_discarded_singular_values(tiny_untied_model_dir, tmp_path, capsys):
    ad = make_adapter(tiny_untied_model_dir, tmp_path / "ad", r=8)
    out = tmp_path / "svd"
    assert main(["svd", "--adapter", str(ad), "--rank", "3", "--output", str(out)]) == 0
    assert "overall energy retained at rank 3" in capsys.readouterr().out
    report = json.loads((out / "svd_report.json").read_text())["layers"]
    before, after = deltas(ad), deltas(out)
    for k, d in before.items():
        s = torch.linalg.svdvals(d.double())
        discarded = float((s[3:] ** 2).sum().sqrt())
        assert abs(float(torch.linalg.norm((after[k] - d).double())) - discarded) < 1e-4 * max(1, discarded)
        assert abs(report[k]["frobenius_error"] - discarded) < 1e-6 * max(1, discarded)
        assert abs(report[k]["energy"] - float((s[:3] ** 2).sum() / (s ** 2).sum())) < 1e-6
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3


def test_weighted_combination_with_token_rows(tiny_untied_model_dir, tmp_path):
    ext, new_ids = extend_model(tiny_untied_model_dir, tmp_path / "ext", ["词甲", "词乙", "词丙"])
    a = make_adapter(ext, tmp_path / "a", seed=1, r=4, trainable_token_indices=new_ids[:2], new_token_ids=new_ids)
    b = make_adapter(ext, tmp_path / "b", seed=2, r=2, targets=["q_proj", "v_proj"],
                     trainable_token_indices=new_ids[1:], new_token_ids=new_ids)
    out = tmp_path / "combined"
    assert main(["svd", "--adapter", str(a), "--adapter", str(b), "--weights", "0.7,0.3", "--rank", "6",
                 "--output", str(out)]) == 0
    da, db, dc = deltas(a), deltas(b), deltas(out)
    for k in dc:
        torch.testing.assert_close(dc[k], 0.7 * da[k] + 0.3 * db.get(k, torch.zeros_like(da[k])), atol=1e-5, rtol=0)
    from safetensors.torch import load_file

    base_emb = load_file(str(ext / "model.safetensors"))["model.embed_tokens.weight"]
    idx, rows = read_adapter(out).rows["model.embed_tokens.weight"]
    assert idx.tolist() == new_ids
    ra, rb = read_adapter(a).rows["model.embed_tokens.weight"][1], read_adapter(b).rows["model.embed_tokens.weight"][1]
    expect_mid = base_emb[new_ids[1]] + 0.7 * (ra[1] - base_emb[new_ids[1]]) + 0.3 * (rb[0] - base_emb[new_ids[1]])
    torch.testing.assert_close(rows[1], expect_mid, atol=1e-6, rtol=0)
    # the combined adapter loads and runs on the extended base
    assert torch.isfinite(peft_logits(ext, [out], probe_ids(len(base_emb), new_ids))).all()
