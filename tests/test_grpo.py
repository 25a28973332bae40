"""`lorakit grpo` on tiny models: group advantages equal hand-computed values; a reward for one token raises its
probability; verifiable rewards score the bundled tasks; only the adapter trains; the output is an adapter run."""
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer

from conftest import write_jsonl
from lora_kit.cli import main
from lora_kit.stages.grpo import prompt_text
from lora_kit.templates import resolve
from lora_kit.training.rewards import answer_format, parse_weights, segment_f1, sentiment
from test_ppo import peaked_model_dir  # noqa: F401 (fixture)
from test_pref_losses import base_watch  # noqa: F401 (fixture)

sys.path.insert(0, str(Path(__file__).parent))  # reward_fn=grpo_rewards:... imports from here
import grpo_rewards  # noqa: E402


def prompts(tmp_path, n=32):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"写一条评价{i}"} for i in range(n)])


def args(model, data, out, *extra):
    return ["grpo", f"model={model}", f"data={data}", f"output_dir={out}", "dtype=fp32", "max_steps=2",
            "save_steps=10", "logging_steps=1", "batch_size=2", "num_generations=4", "max_new_tokens=4",
            "learning_rate=1e-3", "lora.r=4", "eval_data=", *extra]


def test_group_advantages_equal_hand_computed_values(tiny_model_dir, tmp_path, monkeypatch):
    seen = []
    original = GRPOTrainer._generate_and_score_completions

    def scored(self, inputs):  # the batch in generation order (TRL shuffles it afterwards, before the loss)
        out = original(self, inputs)
        seen.append(out["advantages"].clone())
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", scored)
    out = tmp_path / "g"
    assert main(args(tiny_model_dir, prompts(tmp_path), out, "reward_fn=grpo_rewards:fixed", "max_steps=1",
                "rewards=fn:1")) == 0
    fixed = grpo_rewards.FIXED  # two prompts x four completions, in the order TRL groups them
    expected = []
    for g in (fixed[:4], fixed[4:]):
        mean, std = statistics.mean(g), statistics.stdev(g)  # TRL: unbiased std over the group, + 1e-4
        expected += [(r - mean) / (std + 1e-4) for r in g]
    assert torch.allclose(seen[0], torch.tensor(expected), atol=1e-5), (seen[0], expected)

    out2 = tmp_path / "g2"  # no scaling (Dr. GRPO) and weight 2: advantages are 2 (r - group mean)
    assert main(args(tiny_model_dir, prompts(tmp_path), out2, "reward_fn=grpo_rewards:fixed", "max_steps=1",
                     "scale_rewards=none", "rewards=fn:2")) == 0
    expected = [2 * (r - statistics.mean(g)) for g in (fixed[:4], fixed[4:]) for r in g]
    assert torch.allclose(seen[1], torch.tensor(expected), atol=1e-5), (seen[1], expected)


def first_token_probabilities(model, tokenizer, texts) -> torch.Tensor:
    """The next-token distribution after each prompt, averaged over the prompts."""
    with torch.no_grad():
        ids = [tokenizer(t, return_tensors="pt", add_special_tokens=False).input_ids for t in texts]
        probs = [torch.softmax(model(i).logits[0, -1].float(), -1) for i in ids]
    return torch.stack(probs).mean(0)


@pytest.mark.slow
def test_reward_for_one_token_raises_its_probability_and_trains_only_the_adapter(peaked_model_dir, tmp_path,
                                                                                 base_watch, monkeypatch):
    tok = AutoTokenizer.from_pretrained(peaked_model_dir)
    template = resolve("auto", tok)
    texts = [prompt_text(tok, template, [{"role": "user", "content": f"写一条评价{i}"}]) for i in range(32)]
    before = first_token_probabilities(AutoModelForCausalLM.from_pretrained(peaked_model_dir), tok, texts)
    # the rewarded token: the likeliest first token below 0.2 that is whole text on its own (byte-level pieces of a
    # character would not show in the decoded answer)
    whole = lambda i: i not in tok.all_special_ids and "\ufffd" not in tok.decode([i]) and tok.decode([i]).strip() \
        and tok.encode(tok.decode([i]), add_special_tokens=False) == [i]
    target = next(int(i) for i in before.argsort(descending=True) if before[i] < 0.2 and whole(int(i)))
    monkeypatch.setattr(grpo_rewards, "TARGET", tok.decode([target]))

    out = tmp_path / "tok"
    assert main(args(peaked_model_dir, prompts(tmp_path), out, "reward_fn=grpo_rewards:starts_with_target",
                     "rewards=fn:1", "max_steps=12", "batch_size=4", "learning_rate=5e-3", "beta=0.01",
                     "save_steps=100")) == 0
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(peaked_model_dir), str(out))
    after = first_token_probabilities(policy, tok, texts)
    assert after[target] > 1.5 * before[target] and after[target] > before[target] + 0.05, (before[target],
                                                                                           after[target])
    trainable = base_watch["trainable"]  # what the trainer could update: the policy adapter's LoRA weights only
    assert trainable and all("lora_" in n and ".default." in n for n in trainable), trainable[:3]
    assert base_watch["frozen"] > 0 and base_watch["changed_frozen"] == []  # base and reference copy untouched
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "rewards/fn/mean" in r]
    for key in ("rewards/han_share/mean", "completions/mean_length", "reward"):
        assert key in train[-1], train[-1]
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "grpo"
    assert not (out / "ref").exists()  # the frozen reference copy is not part of the output


def test_verifiable_rewards_score_the_bundled_tasks():
    assert sentiment(["p"] * 3, ["正面", " 负面。", "正面的"], ["正面", "负面", "正面"]) == [1.0, 1.0, 0.0]
    assert segment_f1(["p"] * 4, ["中国 人民 站 起来", "中国人民", "中国 人民", "中国 人"],
                      ["中国 人民 站起来", "中国 人民", "中国 人民", "中国 人民"]) == \
        pytest.approx([2 * 2 / (4 + 3), 0.0, 1.0, 0.5])  # spans: 2 of 4 and 3; none; all; 中国 only
    answers, refs = ["正面", "好评", "中国人 民", "中国"], ["负面", "正面", "中国 人民", "中国 人民"]
    assert answer_format(["p"] * 4, answers, refs) == [1.0, 0.0, 1.0, 0.0]
    assert parse_weights("sentiment:1, format:0.2,segment_f1") == {"sentiment": 1.0, "format": 0.2, "segment_f1": 1.0}


def test_unknown_reward_and_missing_reference_are_user_errors(tiny_model_dir, tmp_path, capsys):
    assert main(args(tiny_model_dir, prompts(tmp_path), tmp_path / "a", "rewards=sentimant:1")) == 2
    assert "unknown reward 'sentimant'" in capsys.readouterr().err
    assert main(args(tiny_model_dir, prompts(tmp_path), tmp_path / "b", "rewards=sentiment:1")) == 2
    assert "needs a reference answer" in capsys.readouterr().err


def test_grpo_from_sft_adapter_with_verifiable_reward_and_held_out_curve(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "情感？", "input": f"评论{i}", "output": "正面" if i % 2
                                              else "负面"} for i in range(24)])
    sft = tmp_path / "sft"
    assert main(["sft", f"model={tiny_model_dir}", f"data={data}", f"output_dir={sft}", "max_steps=2", "dtype=fp32",
                 "save_steps=10", "lora.r=4"]) == 0
    out = tmp_path / "grpo"
    assert main(args(tiny_model_dir, data, out, f"sft_adapter={sft}", "rewards=sentiment:1,format:0.5",
                     "eval_fraction=0.25", "eval_steps=1")) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert {"eval_reward/sentiment", "eval_reward/format", "eval_reward/han_share"} <= evals[-1].keys()
    train = [r for r in rows if "kl" in r]
    assert train and all(r["kl"] >= 0 for r in train)
    run = json.loads((out / "run.json").read_text())
    assert run["held_out_reward"] == evals[-1]["eval_reward"]
    assert sorted(load_file(out / "adapter_model.safetensors")) == sorted(load_file(sft / "adapter_model.safetensors"))


def test_held_out_prompts_are_cut_to_cutoff_len_as_the_training_prompts(tiny_model_dir, tmp_path, monkeypatch):
    """An over-long held-out prompt is answered from its last cutoff_len tokens, as GRPO trains on such prompts;
    the held-out curve would otherwise score prompts the policy never sees at that length."""
    import lora_kit.stages.grpo as grpo

    seen = []

    def spy(*a, encoded=None, **kw):
        seen.append([len(e) for e in encoded])
        return real(*a, encoded=encoded, **kw)

    real, cutoff = grpo.generate_answers, 24
    monkeypatch.setattr(grpo, "generate_answers", spy)
    data = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "情感？", "input": "评论" * (2 + 10 * (i % 2)),
                                              "output": "正面"} for i in range(16)])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    full = [len(tok.apply_chat_template([{"role": "user", "content": "情感？\n" + "评论" * k}], tokenize=True,
                                        add_generation_prompt=True)["input_ids"]) for k in (2, 12)]
    assert main(args(tiny_model_dir, data, tmp_path / "g", "rewards=sentiment:1", "eval_fraction=0.5",
                     "eval_steps=2", "max_steps=1", f"cutoff_len={cutoff}")) == 0
    assert seen and all(max(s) <= cutoff for s in seen)
    assert max(full) > cutoff and cutoff in seen[0]  # a long prompt was there and was cut, not left out
