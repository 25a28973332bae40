"""Reliability: mismatches caught before use, NaN stops the run naming the checkpoint, random records never crash
the loader, unwritable outputs fail cleanly."""
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_kit.cli import main
from lora_kit.data import Record, conversations
from lora_kit.errors import LorakitError


def sft(model_dir, out, *extra):
    return ["sft", f"model={model_dir}", "data=zh_sft_mix", f"output_dir={out}", "max_samples=16", "cutoff_len=96",
            "batch_size=2", "max_steps=2", "save_steps=2", "logging_steps=1", "dtype=fp32", *extra]


def test_adapter_from_another_base_is_refused(tiny_model_dir, tmp_path, capsys):
    from conftest import build_tiny_llama
    from transformers import AutoTokenizer

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
    assert str(e.value).split("Last good checkpoint: ")[1].startswith(str(tmp_path / "o" / "checkpoints" / "checkpoint-2"))
    assert not (tmp_path / "o" / "run.json").exists()


def test_unwritable_output_is_a_clean_error(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(sft(tiny_model_dir, blocker / "out")) == 2
    assert capsys.readouterr().err.startswith("lorakit sft: error:")


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
    from lora_kit.data import read_records

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
