"""`lorakit ppo` on tiny models: rule-based reward rises with bounded KL; exact resume; reward/SFT adapter roles."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from lora_kit.cli import main

sys.path.insert(0, str(Path(__file__).parent))  # reward_fn=ppo_rewards:... imports from here


@pytest.fixture(scope="session")
def peaked_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny LLaMA with larger embeddings (init 0.3): peaked next-token distributions a LoRA can move; the default
    init (0.02) gives near-uniform logits that no LoRA on the linear layers can sharpen within a test's budget."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-peaked")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def prompts(tmp_path, n=64):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"写一条评价{i}"} for i in range(n)])


def rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ppo_raises_rule_reward_with_bounded_kl(peaked_model_dir, tmp_path):
    out = tmp_path / "ppo"
    code = main(["ppo", f"model={peaked_model_dir}", f"data={prompts(tmp_path)}", f"output_dir={out}",
                 "reward_fn=ppo_rewards:common_share", "dtype=fp32", "max_steps=30", "learning_rate=1e-3",
                 "ppo_epochs=4", "init_kl_coef=0.1", "kl_target=6", "kl_horizon=100", "batch_size=16",
                 "mini_batch_size=8", "max_new_tokens=16", "logging_steps=1", "save_steps=100", "eval_fraction=0.25",
                 "eval_samples=16", "lora.target_modules=all-linear"])
    assert code == 0
    train = [r for r in rows(out) if "reward" in r]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    assert mean(train[-5:], "reward") > 1.2 * mean(train[:5], "reward"), [r["reward"] for r in train]
    assert max(r["kl"] for r in train) < 12, [r["kl"] for r in train]  # the adaptive controller holds KL near 6
    run = json.loads((out / "run.json").read_text())
    evals = [r["eval_reward"] for r in rows(out) if "eval_reward" in r]
    assert run["held_out_reward"] == pytest.approx(evals[-1], abs=1e-4) and evals[-1] > evals[0]
    for key in ("entropy", "response_len", "clipfrac", "value_loss", "kl_coef"):
        assert key in train[-1]


def _ppo_args(model, data, out, *extra):
    return ["ppo", f"model={model}", f"data={data}", f"output_dir={out}", "reward_fn=ppo_rewards:de_share",
            "dtype=fp32", "max_steps=4", "save_steps=2", "logging_steps=1", "batch_size=4", "mini_batch_size=2",
            "max_new_tokens=6", "learning_rate=5e-3", "eval_fraction=0.25", "eval_samples=4", "kl_target=4",
            "kl_horizon=10", "lora.r=4", *extra]


def test_ppo_resume_is_exact(peaked_model_dir, tmp_path, monkeypatch):
    data = prompts(tmp_path, 12)
    assert main(_ppo_args(peaked_model_dir, data, tmp_path / "a")) == 0

    import lora_kit.stages.ppo as ppo

    real, calls = ppo.ppo_step, []

    def crash_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ppo, "ppo_step", crash_on_third)
    assert main(_ppo_args(peaked_model_dir, data, tmp_path / "b")) == 130
    assert not (tmp_path / "b" / "run.json").exists()
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    monkeypatch.setattr(ppo, "ppo_step", real)
    assert main(_ppo_args(peaked_model_dir, data, tmp_path / "b", "resume=true")) == 0

    for name in ("adapter_model.safetensors", "value/adapter_model.safetensors", "value/value_head.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(rows(tmp_path / "a")) == strip(rows(tmp_path / "b"))
    # output contract: actor adapter at the root, critic beside it
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(tmp_path / "a").task_type == "CAUSAL_LM"
    for name in ("recipe.yaml", "run.json", "metrics.jsonl", "loss.png", "samples.jsonl", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).is_file(), name


def test_ppo_with_reward_and_sft_adapters(tiny_model_dir, tmp_path):
    """Reward from a `lorakit rm` adapter + score head; actor starts from an SFT adapter that is also the reference."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from test_rm import synthetic_pairs

    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(16))
    rm = tmp_path / "rm"
    assert main(["rm", f"model={tiny_model_dir}", f"data={pairs}", f"output_dir={rm}", "max_steps=2",
                 "batch_size=4", "eval_fraction=0", "dtype=fp32"]) == 0
    sft = tmp_path / "sft"
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(sft)
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "评价", "output": "很好"}] * 4)
    out = tmp_path / "ppo"
    assert main(["ppo", f"model={tiny_model_dir}", f"data={prompts(tmp_path, 8)}", f"output_dir={out}",
                 f"reward_adapter={rm}", f"sft_adapter={sft}", "dtype=fp32", "max_steps=2", "batch_size=4",
                 "mini_batch_size=4", "max_new_tokens=6", "logging_steps=1", "save_steps=10", "ppo_epochs=1",
                 f"ptx_data={sft_data}", "ptx_coef=0.5"]) == 0
    train = [r for r in rows(out) if "kl" in r]
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # actor == frozen SFT reference before the first update
    assert all(isinstance(r["reward"], float) and r["ptx_loss"] > 0 for r in train)  # PPO-ptx mixed in
    saved = load_file(out / "adapter_model.safetensors")
    assert any("q_proj" in k for k in saved) and not any("score" in k for k in saved)


def test_ppo_needs_exactly_one_reward(tiny_model_dir, tmp_path, capsys):
    assert main(["ppo", f"model={tiny_model_dir}", f"data={prompts(tmp_path, 4)}", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "exactly one of reward_adapter" in capsys.readouterr().err


def test_verifiable_rewards_add_to_the_score_and_answer_rewards_are_refused(peaked_model_dir, tmp_path, capsys):
    from lora_kit.training.rewards import han_share
    from ppo_rewards import ascii_share

    out = tmp_path / "o"
    args = _ppo_args(peaked_model_dir, prompts(tmp_path, 12), out, "max_steps=2", "reward_fn=ppo_rewards:ascii_share")
    assert main([*args, "rewards=han_share:2"]) == 0
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6  # 3 held-out prompts, before and after
    for s in samples:  # the score PPO optimised is the function's value plus 2 x the response's Han share
        want = ascii_share(None, [s["response"]])[0] + 2 * han_share(None, [s["response"]])[0]
        assert s["score"] == pytest.approx(want, abs=1e-4), s
    assert any(han_share(None, [s["response"]])[0] > 0 for s in samples)  # the added term is not always zero
    capsys.readouterr()
    assert main([*_ppo_args(peaked_model_dir, prompts(tmp_path, 12), tmp_path / "r"), "rewards=sentiment:1"]) == 2
    err = capsys.readouterr().err
    assert "rewards: 'sentiment' needs reference answers" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
