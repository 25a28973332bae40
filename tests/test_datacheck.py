"""`lorakit data check` on preference pairs, PPO prompts and pretraining text: every problem listed as `file:line: field
...`, the format given or detected, and training stopping on the same first problem before it loads a model."""
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_jsonl
from lora_kit.cli import main
from lora_kit.data.check import check
from lora_kit.data.records import BUNDLED_DIR

BAD_PAIRS = [
    {"instruction": "q", "chosen": "a", "rejected": "b"},  # 1 fine
    {"instruction": "q", "chosen": "a", "rejected": "a"},  # 2 identical
    {"instruction": "", "rejected": ""},  # 3 three problems
    "nope",  # 4 not an object
    {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "human", "value": "x"},
     "rejected": {"from": "gpt", "value": "y"}},  # 5 chosen by the user
    {"instruction": "r", "responses": ["A", 3, ""]},  # 6 two bad responses
    {"instruction": "q", "chosen": "a", "rejected": "b"},  # 7 duplicate of 1
    {"conversations": [{"from": "alien", "value": "hi"}], "chosen": "x", "rejected": "y"},  # 8 unknown role
    {"conversations": [], "chosen": "x", "rejected": "y"},  # 9 empty conversation
    {"instruction": "r", "responses": ["only one"]},  # 10 too few
]


def run_check(capsys, *args) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["data", "check", *map(str, args)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out.splitlines()


def test_preference_pairs_every_problem_with_line_and_field(tmp_path, capsys):
    f = write_jsonl(tmp_path / "p.jsonl", BAD_PAIRS)
    with open(f, "ab") as fh:
        fh.write(b'{"instruction": "x", \n{"instruction": "\xff", "chosen": "a", "rejected": "b"}\n')  # 11, 12
    code, out = run_check(capsys, f)
    p = str(f)
    assert code == 1
    assert out[:-2] == [
        f"{p}:2: field 'rejected' is identical to 'chosen'",
        f"{p}:3: field 'instruction' and 'input' are both empty",
        f"{p}:3: field 'chosen' is missing (or give 'responses', a list ranked best first)",
        f"{p}:3: field 'rejected' is empty",
        f"{p}:4: a record must be a JSON object, got str",
        f"{p}:5: field 'chosen.from' must be an assistant role, got 'human'",
        f"{p}:6: field 'responses[1]' must be a string or {{from, value}}, got int",
        f"{p}:6: field 'responses[2]' is empty",
        f"{p}:7: duplicate of record 1",
        f"{p}:8: field 'conversations[0].from' has unknown role 'alien' (expected one of assistant, bot, gpt, human, "
        "model, system, user)",
        f"{p}:9: field 'conversations' is an empty conversation",
        f"{p}:10: field 'responses' must be a list of at least 2 responses, best first",
        f"{p}:11: invalid JSON (Expecting property name enclosed in double quotes, column 1)",
        f"{p}:12: invalid UTF-8 at byte 17",
    ]
    assert out[-1] == f"{p}: 10 records, 14 problems"


def test_valid_pairs_and_prompts_pass_auto_detected(tmp_path, capsys):
    ranked = write_jsonl(tmp_path / "r.jsonl", [
        {"instruction": "q", "responses": ["A", "B", {"from": "gpt", "value": "C"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"}],
         "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}},
        {"messages": [{"role": "user", "content": "hi"}], "chosen": "x", "rejected": "y"}])
    for f in (ranked, BUNDLED_DIR / "zh_review_pairs.jsonl", BUNDLED_DIR / "zh_review_prompts.jsonl"):
        code, out = run_check(capsys, f)
        assert code == 0 and out[-1].endswith(" 0 problems"), out


def test_format_option_overrides_detection(tmp_path, capsys):
    sft = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "q", "output": "a"}])
    code, out = run_check(capsys, sft, "--format", "pairs")
    assert code == 1 and out[0] == f"{sft}:1: field 'chosen' is missing (or give 'responses', a list ranked best first)"
    code, out = run_check(capsys, sft, "--format", "text")
    assert code == 1 and out[0] == f"{sft}:1: field 'text' is missing"
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "q"}, {"prompt": ""}, {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "assistant", "content": "c"}]}])
    code, out = run_check(capsys, prompts, "--format", "prompts")
    assert out[:-2] == [f"{prompts}:2: field 'prompt' is empty",
                        f"{prompts}:3: field 'messages': the prompt must end with a user turn"]


def test_text_file_and_jsonl_text(tmp_path, capsys):
    txt = tmp_path / "t.txt"
    txt.write_bytes("一篇文章\n\nbad \xff byte\n一篇文章\n另一篇\n".encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    code, out = run_check(capsys, txt)
    assert code == 1 and out == [f"{txt}:3: invalid UTF-8 at character 4", f"{txt}:4: duplicate of line 1",
                                 f"{txt}: read as text (the format pretrain reads)", f"{txt}: 3 documents, 2 problems"]
    jl = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": ""}, {"text": 5}, {"txt": "x"}, {"text": "a"}])
    code, out = run_check(capsys, jl, "--format", "text")
    assert out[:-2] == [f"{jl}:2: field 'text' is empty", f"{jl}:3: field 'text' must be a string, got int",
                        f"{jl}:4: field 'text' is missing", f"{jl}:5: duplicate of record 1"]
    # a directory, as `pretrain data=DIR` reads it: every .txt/.jsonl file, duplicates across files named
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("甲\n乙\n", encoding="utf-8")
    write_jsonl(d / "b.jsonl", [{"text": "乙"}, {"text": ""}])
    code, out = run_check(capsys, d)
    assert code == 1 and out == [f"{d / 'b.jsonl'}:1: duplicate of line 2 of {d / 'a.txt'}",
                                 f"{d / 'b.jsonl'}:2: field 'text' is empty",
                                 f"{d}: read as text (the format pretrain reads)", f"{d}: 3 documents, 2 problems"]
    empty = tmp_path / "e.txt"
    empty.write_text("\n \n", encoding="utf-8")
    assert run_check(capsys, empty) == (1, [f"{empty}: no text (every line is empty)",
                                            f"{empty}: read as text (the format pretrain reads)",
                                            f"{empty}: 0 documents, 1 problems"])


def test_over_cutoff_counted_with_the_training_template(tiny_model_dir, tmp_path, capsys):
    f = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "短", "chosen": "好", "rejected": "差"},
                                           {"instruction": "长" * 60, "chosen": "好", "rejected": "差" * 80}])
    code, out = run_check(capsys, f, "--model", tiny_model_dir, "--cutoff-len", "64")
    assert code == 1 and len(out) == 3  # the problem, the format read, the summary
    assert out[0].startswith(f"{f}:2: ") and out[0].endswith("tokens, over cutoff_len 64 (will be truncated)")
    # overlong=drop: every stage drops such a record (records.fit_to_cutoff)
    for stage in (None, "rm", "dpo"):
        code, out = run_check(capsys, f, "--model", tiny_model_dir, "--cutoff-len", "64", "--overlong", "drop",
                              *(("--for", stage) if stage else ()))
        assert code == 1 and out[0].endswith("tokens, over cutoff_len 64 (will be dropped)"), out
    sft_file = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "长" * 80, "output": "好"}])
    code, out = run_check(capsys, sft_file, "--model", tiny_model_dir, "--cutoff-len", "64", "--overlong", "drop")
    assert code == 1 and out[0].endswith("tokens, over cutoff_len 64 (will be dropped)"), out


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "kto", "ppo", "grpo"])
def test_every_stage_drops_what_data_check_says_it_drops(stage, tiny_model_dir, tmp_path, capsys):
    """One cutoff rule (records.fit_to_cutoff) in every stage: with overlong=drop, the one record data check finds over
    cutoff_len is the one record each stage's plan leaves out (--dry-run prints the counts before loading weights)."""
    long = "长" * 80
    records = {"sft": [{"instruction": "短", "output": "好"}, {"instruction": "短", "output": "好" * 80},
                       {"instruction": long, "output": "好"}],
               "pairs": [{"instruction": "短", "chosen": "好", "rejected": "差"},
                         {"instruction": "短", "chosen": "好", "rejected": "差" * 80}],
               "kto": [{"instruction": "短", "completion": "好", "label": True},
                       {"instruction": "短", "completion": "差" * 80, "label": False}],
               "prompts": [{"instruction": "短"}, {"instruction": long}, {"instruction": "也短"}]}
    kind = {"sft": "sft", "kto": "kto", "ppo": "prompts", "grpo": "prompts"}.get(stage, "pairs")
    data = write_jsonl(tmp_path / "d.jsonl", records[kind][:3 if stage == "sft" else None])
    code, out = run_check(capsys, data, "--model", tiny_model_dir, "--cutoff-len", "64", "--overlong", "drop")
    over = [line for line in out if "over cutoff_len 64 (will be dropped)" in line]
    assert code == 1 and len(over) == (2 if stage == "sft" else 1), out
    name, extra = ("dpo", ["loss=kto"]) if stage == "kto" else (stage, [])
    extra += {"ppo": ["reward_fn=ppo_rewards:de_share"], "grpo": ["rewards=han_share:1", "eval_data="]}.get(stage, [])
    capsys.readouterr()
    assert main([name, f"model={tiny_model_dir}", f"data={data}", f"output_dir={tmp_path / 'o'}", "cutoff_len=64",
                 "overlong=drop", "eval_fraction=0", "packing=false", *extra, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    dropped = "2 dropped" if stage == "sft" else "1 dropped as over-long"
    assert dropped in printed, printed


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_a_prompt_set_with_every_prompt_over_cutoff_is_one_line_naming_the_file(stage, tiny_model_dir, tmp_path,
                                                                                  capsys):
    data = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "长" * 80}, {"instruction": "也" * 80}])
    extra = {"ppo": ["reward_fn=ppo_rewards:de_share"], "grpo": ["rewards=han_share:1", "eval_data="]}[stage]
    capsys.readouterr()
    assert main([stage, f"model={tiny_model_dir}", f"data={data}", f"output_dir={tmp_path / 'o'}", "cutoff_len=32",
                 "overlong=drop", "eval_fraction=0", *extra, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == f"lorakit {stage}: error: {data}: every training prompt is over cutoff_len=32 (overlong=drop)\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage", ["rm", "dpo", "ppo", "pretrain"])
def test_training_stops_on_the_first_problem_check_reports(stage, tiny_model_dir, tmp_path, capsys):
    """Training validates with the same functions before it loads the model: the same file:line: field message."""
    if stage == "pretrain":
        data = tmp_path / "t.txt"
        data.write_bytes(b"good line one\ngood line two\nbad \xff\n")
    elif stage == "ppo":
        data = write_jsonl(tmp_path / "q.jsonl",
                           [{"instruction": "q"}, {"messages": [{"role": "robot", "content": "x"}]}])
    else:
        data = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "q", "chosen": "a", "rejected": "b"},
                                                  {"instruction": "q", "chosen": "a", "rejected": 7}])
    first = check(str(data))[1][0]
    extra = ["reward_fn=ppo_rewards:de_share"] if stage == "ppo" else []
    capsys.readouterr()
    assert main([stage, f"model={tiny_model_dir}", f"data={data}", f"output_dir={tmp_path / 'o'}", *extra]) == 2
    err = capsys.readouterr().err
    assert err == f"lorakit {stage}: error: {first}\n"
    assert not (tmp_path / "o").exists()


keys = st.sampled_from(["instruction", "input", "chosen", "rejected", "responses", "conversations", "messages", "from",
                        "value", "role", "content", "text", "prompt", "system", "history"])
values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                      max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(keys, values, max_size=4) | values, min_size=1, max_size=4),
       st.sampled_from(["auto", "pairs", "prompts", "text", "alpaca", "sharegpt", "messages"]))
def test_random_records_never_traceback(tmp_path, recs, fmt):
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    n, problems = check(str(f), fmt)
    assert n == len(recs)
    assert all(p.startswith(f"{f}:") and "\n" not in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------- issue 18
def _write(path, text: str, bom: bool = False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


ALPACA = {"instruction": "你好", "output": "你好！"}
# name -> (writer, the message `sft` and `data check --for sft` give, or None when both accept it)
SFT_INPUTS = {
    "jsonl": (lambda d: _write(d / "a.jsonl", json.dumps(ALPACA, ensure_ascii=False) + "\n"), None),
    "jsonl with BOM": (lambda d: _write(d / "a.jsonl", json.dumps(ALPACA, ensure_ascii=False) + "\n", bom=True), None),
    "json with BOM": (lambda d: _write(d / "a.json", json.dumps([ALPACA], ensure_ascii=False), bom=True), None),
    "csv with BOM": (lambda d: _write(d / "a.csv", "instruction,output\n你好,你好！\n", bom=True), None),
    "csv prompt/completion": (lambda d: _write(d / "a.csv", "prompt,completion\n你好,你好！\n"),
                              ":2: unrecognised record"),
    "parquet prompt/completion": (lambda d: _parquet(d / "a.parquet", [{"prompt": "你好", "completion": "好"}]),
                                  ": record 1: unrecognised record"),
    "null output": (lambda d: _write(d / "a.jsonl", '{"instruction": "q", "output": null}\n'),
                    ":1: field 'output' is null"),
    "json array, bad third record": (lambda d: _write(d / "a.json", json.dumps([ALPACA, ALPACA, {"instruction": 1,
                                                                                               "output": "x"}])),
                                     ": record 3: field 'instruction' must be a string"),
    "alpaca and conversations": (lambda d: _write(d / "a.jsonl", json.dumps({**ALPACA, "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n"),
                                 ":1: ambiguous record: it has the fields of alpaca and sharegpt"),
    "directory": (lambda d: (d / "dir.jsonl").mkdir() or d / "dir.jsonl", ": is a directory"),
    "fifo": (lambda d: os.mkfifo(d / "f.jsonl") or d / "f.jsonl", ": not a regular file"),
}


@pytest.mark.parametrize("name", list(SFT_INPUTS))
def test_data_check_for_sft_and_sft_agree(name, tiny_model_dir, tmp_path, capsys):
    from lora_kit.errors import LorakitError
    from lora_kit.models.load import load_tokenizer
    from lora_kit.recipe import load_config
    from lora_kit.stages import sft
    from lora_kit.templates import resolve

    make, message = SFT_INPUTS[name]
    path = make(tmp_path)
    code, out = run_check(capsys, "--for", "sft", path)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = load_config(sft.Config, None, [f"data={path}", "cutoff_len=96", "overlong=truncate"])
    try:
        sft.prepare_data(cfg, tokenizer, resolve("auto", tokenizer))
        trained = None
    except LorakitError as e:
        trained = str(e)
    if message is None:
        assert code == 0 and trained is None, (out, trained)
        assert any("read as alpaca (the format sft reads)" in l for l in out), out
    else:
        assert code == 1 and trained is not None and f"{path}{message}" in trained, trained
        assert any(f"{path}{message}" in l for l in out), out


def test_data_check_names_the_detected_format(tmp_path, capsys):
    csv = _write(tmp_path / "p.csv", "prompt,completion\n你好,你好！\n")
    code, out = run_check(capsys, csv)  # a completion column reads as KTO's unpaired kind, which needs a label
    assert code == 1 and f"{csv}: read as unpaired (the format dpo loss=kto reads)" in out
    assert any("field 'label' is missing" in line for line in out)
    code, out = run_check(capsys, csv, "--for", "ppo")
    assert code == 0 and f"{csv}: read as prompts (the format ppo reads)" in out
