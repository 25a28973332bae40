"""Preference pairs and RL prompts: accepted shapes, errors naming file:line: field, the bundled builder."""
import json

import pytest

from conftest import write_jsonl
from lora_kit.data.pairs import build_preference_data, read_pairs, read_prompts
from lora_kit.errors import LorakitError


def test_demo_sharegpt_pairs_parse():
    from conftest import SHARED

    if not (SHARED / "dpo_zh_demo.json").is_file():
        pytest.skip(f"{SHARED / 'dpo_zh_demo.json'} absent")
    groups = read_pairs(str(SHARED / "dpo_zh_demo.json"))
    assert len(groups) == 300 and all(len(g) == 1 for g in groups)
    assert any(g[0].prompt[0]["role"] == "system" for g in groups)


@pytest.mark.parametrize("record, message", [
    ({"instruction": "q", "chosen": "a"}, ":1: field 'rejected' is missing"),
    ({"instruction": "q", "chosen": "a", "rejected": "a"}, ":1: field 'rejected' is identical"),
    ({"instruction": "q", "chosen": 3, "rejected": "b"}, ":1: field 'chosen' must be a string"),
    ({"instruction": "q", "responses": ["only one"]}, ":1: field 'responses' must be a list of at least 2"),
    ({"conversations": [{"from": "gpt", "value": "x"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, "turn 1 is 'assistant'"),
    ({"conversations": [{"from": "human", "value": "x"}], "chosen": {"from": "human", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, ":1: field 'chosen.from' must be an assistant role"),
])
def test_pair_errors_name_file_line_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(LorakitError, match=message.replace("(", r"\(")) as e:
        read_pairs(str(path))
    assert str(path) in str(e.value)


def test_prompts_from_any_shape(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"instruction": "写评价", "input": "手机"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "answer"}]},
        {"messages": [{"role": "user", "content": "m"}]},
        {"prompt": "plain"}])
    got = [p[-1]["content"] for p in read_prompts(str(path))]
    assert got == ["写评价\n手机", "hi", "m", "plain"]


def test_builder_is_deterministic_and_small(tmp_path):
    a = build_preference_data(tmp_path / "a")
    b = build_preference_data(tmp_path / "b")
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes() and x.stat().st_size < 500_000
    pairs = [json.loads(l) for l in a[0].read_text().splitlines()]
    assert len(pairs) == 1000 and all(p["chosen"] != p["rejected"] for p in pairs)
    assert abs(sum(len(p["chosen"]) - len(p["rejected"]) for p in pairs)) / len(pairs) < 1  # length-matched
    assert len(read_prompts(str(a[1]))) == 240
    from lora_kit.data.records import BUNDLED_DIR

    for built in a:  # the shipped files are exactly what the builder makes
        assert built.read_bytes() == (BUNDLED_DIR / built.name).read_bytes()
