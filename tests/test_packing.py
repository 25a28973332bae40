"""Padding of SFT batches: the trainer's own dataloader groups rows of similar length, so packed batches are almost all
real tokens; the padding estimate printed before training and written to run.json matches what the dataloader does."""
import json

from lora_kit.data.records import batch_padding
from lora_kit.recipe import load_config
from lora_kit.stages import sft


def test_batch_padding_counts_pad_to_longest_row():
    assert batch_padding([8, 8, 8, 8], batch_size=2) == 0.0
    # one batch of 2 rows (8 and 4): 16 processed, 4 of them padding
    assert batch_padding([8, 4], batch_size=2) == 0.25
    # grouped by length (sorted within mega-batches of 24 rows): at most one mixed pair per mega-batch
    assert batch_padding([8, 4] * 50, batch_size=2, seed=3) < 0.05


def test_trainer_batches_of_packed_rows_are_almost_all_real_tokens(tiny_model_dir, tmp_path):
    cfg = load_config(sft.Config, "alpaca_zh", [f"model={tiny_model_dir}", "data=zh_sft_mix", "max_samples=600",
                                                 "cutoff_len=256", "batch_size=4", "max_steps=2", "dtype=fp32",
                                                 f"output_dir={tmp_path / 'out'}"])
    job = sft.setup(cfg)
    rows = job.trainer.train_dataset
    lengths = [len(r["input_ids"]) for r in rows]
    assert min(lengths) < 0.9 * cfg.cutoff_len  # partial rows exist, so random batches would carry padding
    processed = sum(b["input_ids"].numel() for b in job.trainer.get_train_dataloader())
    measured = 1 - sum(lengths) / processed  # one epoch: every row once
    assert measured < 0.02, measured
    assert abs(measured - job.stats.extra["padding"]) < 0.01


def test_padding_fraction_is_recorded_in_run_json(tiny_model_dir, tmp_path):
    cfg = load_config(sft.Config, "alpaca_zh", [f"model={tiny_model_dir}", "data=zh_sft_mix", "max_samples=64",
                                                 "cutoff_len=128", "batch_size=2", "max_steps=1", "save_steps=1",
                                                 "dtype=fp32", f"output_dir={tmp_path / 'out'}"])
    out = sft.run(cfg)
    stats = json.loads((out / "run.json").read_text())["data_stats"]
    assert 0 <= stats["extra"]["padding"] < 0.05 and "fill" in stats["extra"]
