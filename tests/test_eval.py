"""`lorakit eval` on tiny models and tiny benchmark CSVs written here: rigged accuracy, k-shot prompts, segmentation F1,
an extended-vocabulary adapter evaluated without merging, malformed files, and the side-by-side suite."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_kit.cli import main
from lora_kit.errors import LorakitError
from lora_kit.evaluate.bpc import score_documents
from lora_kit.evaluate.choice import (
    BENCHMARKS,
    MIN_SHARED,
    build_prompt,
    evaluate_benchmark,
    load_benchmark,
    score_questions,
)
from lora_kit.evaluate.scores import char_f1, segmentation_prf
from lora_kit.evaluate.suite import CMMLU_SUBSET
from lora_kit.models.builder import load_for_inference
from lora_kit.models.load import signature
from merge_helpers import extend_model, make_adapter

HEADER = ",Question,A,B,C,D,Answer\n"


def write_cmmlu(root, subjects: dict[str, str], dev_rows: int = 5) -> None:
    """A CMMLU-layout directory: each subject's test answers as given, `dev_rows` dev examples."""
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for name, answers in subjects.items():
        test = "".join(f"{i},{name}题目{i}是什么,甲{i},乙{i},丙{i},丁{i},{a}\n" for i, a in enumerate(answers))
        (root / "test" / f"{name}.csv").write_text(HEADER + test, encoding="utf-8")
        dev = "".join(f"{i},{name}示例{i},甲,乙,丙,丁,{'ABCD'[i % 4]}\n" for i in range(dev_rows))
        (root / "dev" / f"{name}.csv").write_text(HEADER + dev, encoding="utf-8")


def rig_to_prefer(model, tokenizer, letter: str):
    """Zero the LM head and give `letter`'s token a bias: every position predicts it, nothing else differs."""
    ids = {i for text in (letter, " " + letter) for i in tokenizer(text, add_special_tokens=False)["input_ids"]}
    ids -= set(tokenizer(" ", add_special_tokens=False)["input_ids"])
    head = model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[list(ids)] = 20.0
    with torch.no_grad():
        head.weight.zero_()
    head.bias = torch.nn.Parameter(bias)
    return model


@pytest.mark.parametrize("shots", [0, 2])
def test_rigged_model_scores_exactly_its_share(tiny_untied_model_dir, tmp_path, shots):
    root = tmp_path / "cmmlu"
    write_cmmlu(root, {"agronomy": "BBACD", "arts": "BDDDB"})
    (root / "categories.json").write_text(json.dumps({
        "name_en2zh": {"agronomy": "农学", "arts": "艺术学"},
        "subcategories": {"agronomy": ["other"], "arts": ["arts"]},
        "categories": {"Other": ["other"], "Humanities": ["arts"]}}), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(tiny_untied_model_dir)
    model = rig_to_prefer(AutoModelForCausalLM.from_pretrained(tiny_untied_model_dir, dtype=torch.float32), tok, "B")
    res = evaluate_benchmark(model, tok, "cmmlu", root, shots=shots, batch_size=3, progress=False)
    assert res["n"] == 10 and res["accuracy"] == pytest.approx(4 / 10)
    assert res["subjects"]["agronomy"] == {"n": 5, "accuracy": pytest.approx(2 / 5), "categories": ["Other"]}
    assert res["subjects"]["arts"]["accuracy"] == pytest.approx(2 / 5)
    assert res["categories"]["Humanities"] == {"n": 5, "accuracy": pytest.approx(2 / 5)}
    assert {q["predicted"] for q in res["questions"]} == {"B"}
    limited = evaluate_benchmark(model, tok, "cmmlu", root, shots=shots, limit=2, progress=False)
    assert limited["n"] == 4 and limited["accuracy"] == pytest.approx(3 / 4)  # BB, BD


def test_k_shot_prompt_holds_exactly_k_dev_examples_of_the_subject(tmp_path):
    root = tmp_path / "cmmlu"
    write_cmmlu(root, {"agronomy": "AB", "arts": "CD"}, dev_rows=5)
    subjects = {s.name: s for s in load_benchmark("cmmlu", root)}
    bench = BENCHMARKS["cmmlu"]
    for k in (0, 1, 3, 5):
        prompt = build_prompt(subjects["agronomy"], subjects["agronomy"].scored[1], bench, k)
        assert prompt.count("答案：") == k + 1 and prompt.count("agronomy示例") == k
        assert "arts" not in prompt and prompt.startswith("以下是关于agronomy的单项选择题")
        assert prompt.endswith("agronomy题目1是什么\nA. 甲1\nB. 乙1\nC. 丙1\nD. 丁1\n答案：")
        assert all(f"agronomy示例{i}\n" in prompt for i in range(k)) and f"agronomy示例{k}\n" not in prompt
    assert "agronomy示例0\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案： A\n\nagronomy示例1" in build_prompt(
        subjects["agronomy"], subjects["agronomy"].scored[0], bench, 2)
    with pytest.raises(LorakitError, match="6-shot needs 6 dev examples, the split has 5"):
        build_prompt(subjects["arts"], subjects["arts"].scored[0], bench, 6)


def test_cached_shot_prefix_scores_like_the_whole_prompt(tiny_model_dir, tmp_path):
    root = tmp_path / "cmmlu"
    write_cmmlu(root, {"agronomy": "ABCDABC", "arts": "DCBAD"})
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    subs = load_benchmark("cmmlu", root)
    items = [(s, q) for s in subs for q in s.scored]
    prompts = [build_prompt(s, q, BENCHMARKS["cmmlu"], 3) for s, q in items]
    assert len(tok(prompts[0])["input_ids"]) > 2 * MIN_SHARED  # the shots are long enough to be cached
    cached = score_questions(model, tok, prompts, groups=[s.name for s, _ in items], batch_size=3, progress=False)
    whole = score_questions(model, tok, prompts, batch_size=1, progress=False)
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(whole), atol=1e-4, rtol=0)
    assert len({tuple(round(x, 3) for x in sc) for sc in whole}) == len(prompts)  # questions really differ


def test_segmentation_f1_and_char_f1_match_hand_computed_values():
    one = segmentation_prf(["我 爱 北 京 天安门"], ["我 爱 北京 天安门"])
    assert (one["words_correct"], one["words_predicted"], one["words_reference"]) == (3, 5, 4)
    assert one["precision"] == pytest.approx(3 / 5) and one["recall"] == pytest.approx(3 / 4)
    assert one["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    # corpus level: counts add up over sentences (3+2 correct of 5+2 predicted, 4+3 reference)
    two = segmentation_prf(["我 爱 北 京 天安门", "今天 天气好"], ["我 爱 北京 天安门", "今天 天气 好"])
    assert two["precision"] == pytest.approx(4 / 7) and two["recall"] == pytest.approx(4 / 7)
    assert segmentation_prf(["中国 人民"], ["中国 人民"])["f1"] == 1.0
    assert char_f1("正面评价", "正面") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert char_f1("负面", "正面") == pytest.approx(0.5) and char_f1("", "") == 1.0


def test_extended_vocab_adapter_evaluates_unmerged_like_the_merged_model(tiny_model_dir, tmp_path):
    ext, new_ids = extend_model(tiny_model_dir, tmp_path / "ext", ["题目", "答案", "农学", "评论"])
    ad = make_adapter(ext, tmp_path / "ad", seed=3, trainable_token_indices=new_ids, tokenizer_dir=ext,
                      new_token_ids=new_ids)
    run = json.loads((ad / "run.json").read_text())
    run["base_signature"] = signature(AutoModelForCausalLM.from_pretrained(ext).config)  # as every lorakit stage writes
    (ad / "run.json").write_text(json.dumps(run))
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(ad), "--output", str(merged), "--dtype", "fp32"]) == 0
    root = tmp_path / "cmmlu"
    write_cmmlu(root, {"agronomy": "ABCDA", "arts": "DCBAB"})
    texts = ["这条评论的答案是正面", "农学题目：牛的发情周期平均为多少天"]

    def measure(model, adapter):
        net, tok, _ = load_for_inference(model, adapter, dtype="fp32")
        res = evaluate_benchmark(net, tok, "cmmlu", root, shots=1, progress=False)
        return net, res, score_documents(net, tok, texts).bits_per_char

    grown, direct, bpc_direct = measure(str(tiny_model_dir), str(ad))  # the original base, grown for the adapter
    assert grown.get_input_embeddings().weight.shape[0] == len(AutoTokenizer.from_pretrained(ext)) > \
        AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight.shape[0]
    _, via_merge, bpc_merged = measure(str(merged), None)
    _, bare, bpc_bare = measure(str(tiny_model_dir), None)
    assert abs(bpc_direct - bpc_bare) > 1e-3  # the adapter really changes the model
    assert bpc_direct == pytest.approx(bpc_merged, abs=1e-5)
    for a, b in zip(direct["questions"], via_merge["questions"]):
        assert a["predicted"] == b["predicted"] and a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)
    assert direct["accuracy"] == via_merge["accuracy"]


@pytest.mark.parametrize("case, message", [
    ("missing", r"test/agronomy.csv: row 1: missing field 'Answer'"),
    ("letter", r"test/agronomy.csv: row 3: field 'Answer' is 'E', expected one of A, B, C, D"),
    ("short", r"test/agronomy.csv: row 2: missing field 'D'"),
    ("empty", r"test/agronomy.csv: empty split \(no questions\)"),
    ("nofiles", r"cmmlu/test: empty split \(no cmmlu CSV files\)"),
])
def test_malformed_benchmark_files_name_file_row_and_field(tmp_path, case, message):
    root = tmp_path / "cmmlu"
    write_cmmlu(root, {"agronomy": "AB"})
    bad = root / "test" / "agronomy.csv"
    content = {"missing": ",Question,A,B,C,D\n0,q,a,b,c,d\n",
               "letter": HEADER + "0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n",
               "short": HEADER + "0,q,a,b,c\n",
               "empty": HEADER}
    if case == "nofiles":
        bad.unlink()
    else:
        bad.write_text(content[case], encoding="utf-8")
    with pytest.raises(LorakitError, match=message) as err:
        load_benchmark("cmmlu", root)
    assert "\n" not in str(err.value)


def test_ceval_and_mmlu_layouts_read_through_the_same_code(tmp_path):
    ceval = tmp_path / "ceval"
    for split, answer in (("val", "C"), ("dev", "A"), ("test", "")):
        (ceval / split).mkdir(parents=True)
        (ceval / split / f"computer_network_{split}.csv").write_text(
            f"id,question,A,B,C,D,answer,explanation\n0,网络问题,a,b,c,d,{answer},因为\n", encoding="utf-8")
    (ceval / "subject_mapping.json").write_text(json.dumps({"computer_network": ["Computer Network", "计算机网络",
                                                                                    "STEM"]}), encoding="utf-8")
    [s] = load_benchmark("ceval", ceval)
    assert (s.display, s.categories, s.scored[0].answer, len(s.dev)) == ("计算机网络", ["STEM"], 2, 1)
    assert build_prompt(s, s.scored[0], BENCHMARKS["ceval"], 1).startswith("以下是中国关于计算机网络考试的单项选择题")
    mmlu = tmp_path / "mmlu"
    for split in ("dev", "test"):
        (mmlu / split).mkdir(parents=True)
        (mmlu / split / f"high_school_physics_{split}.csv").write_text('"What, is it?",a,b,c,d,D\n', encoding="utf-8")
    [m] = load_benchmark("mmlu", mmlu)
    prompt = build_prompt(m, m.scored[0], BENCHMARKS["mmlu"], 1)
    assert prompt.startswith("The following are multiple choice questions (with answers) about high school physics.")
    assert prompt.endswith("What, is it?\nA. a\nB. b\nC. c\nD. d\nAnswer:") and prompt.count("Answer: D\n\n") == 1


def test_suite_puts_base_and_adapter_side_by_side(tiny_model_dir, tmp_path, capsys):
    ad = make_adapter(tiny_model_dir, tmp_path / "ad", seed=4)
    cmmlu = tmp_path / "cmmlu"
    write_cmmlu(cmmlu, {name: "ABCD" for name in CMMLU_SUBSET})
    out = tmp_path / "suite"
    argv = ["eval", "--suite", "zh", "--model", str(tiny_model_dir), "--adapter", str(ad), "--limit", "2",
            "--cmmlu", str(cmmlu), "--dtype", "fp32", "--output", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert f"| metric | {tiny_model_dir.name} | +ad | n |" in table and "en bits/char (forgetting)" in table
    result = json.loads((out / "suite.json").read_text())
    assert result["columns"] == [tiny_model_dir.name, "+ad"]
    assert set(result["metrics"]) == {"zh_bits_per_char", "en_bits_per_char", "zh_tokens_per_char",
                                      "en_tokens_per_char", "sentiment_accuracy", "segment_f1", "cmmlu_accuracy"}
    bpc = result["metrics"]["en_bits_per_char"]
    assert bpc[tiny_model_dir.name] != bpc["+ad"] and all(v > 0 for v in bpc.values())
    assert result["counts"]["cmmlu_accuracy"] == 2 * len(CMMLU_SUBSET) and result["counts"]["sentiment_accuracy"] == 2
    assert (out / "suite.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 2 and "suite.json: already exists; pass --force" in capsys.readouterr().err
