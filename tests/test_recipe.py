"""Recipes: every shipped recipe loads into its stage's config; overrides are typed; mistakes are reported together."""
import importlib

import pytest

from lora_kit.cli import main
from lora_kit.commands import BY_NAME
from lora_kit.errors import LorakitError
from lora_kit.recipe import list_recipes, load_config
from lora_kit.stages.sft import Config

REQUIRED = ["model", "data", "output_dir", "max_steps", "save_steps", "learning_rate", "quantization", "packing",
            "seed", "resume"]


@pytest.mark.parametrize("name,stage", [(r[0], r[1]) for r in list_recipes()])
def test_every_shipped_recipe_loads(name, stage):
    config_cls = importlib.import_module(BY_NAME[stage].module).Config
    cfg = load_config(config_cls, name)
    assert cfg.model and cfg.output_dir == ""  # output_dir is always the user's choice


def test_required_keys_exist_with_their_names():
    cfg = load_config(Config, "alpaca_zh")
    for key in REQUIRED:
        assert hasattr(cfg, key), key
    assert cfg.quantization == "none" and cfg.learning_rate == 5e-4 and cfg.lora.target_modules == "all-linear"


def test_overrides_are_coerced_to_field_types():
    cfg = load_config(Config, "alpaca_zh", ["max_steps=7", "learning_rate=3e-4", "packing=false", "lora.r=16",
                                            "quantization=4bit", "data=x.json=y"])
    assert (cfg.max_steps, cfg.learning_rate, cfg.packing, cfg.lora.r, cfg.quantization) == (7, 3e-4, False, 16, "4bit")
    assert cfg.data == "x.json=y"  # split on the first '=' only


def test_all_problems_reported_together_with_close_match():
    with pytest.raises(LorakitError) as e:
        load_config(Config, "alpaca_zh", ["max_step=3", "lora.rr=2", "packing=maybe", "quantization=3bit"])
    msg = str(e.value)
    assert "unknown key 'max_step'; did you mean 'max_steps'?" in msg
    assert "unknown key 'lora.rr'; did you mean 'lora.r'?" in msg
    assert "'packing' must be true or false" in msg
    assert "'quantization' must be one of none | 4bit | 8bit" in msg


def test_unknown_recipe_suggests_a_name():
    with pytest.raises(LorakitError, match="did you mean 'alpaca_zh'"):
        load_config(Config, "alpaca_z")


def test_recipe_file_with_unknown_key_names_the_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("model: smollm2-135m\nlearning_rat: 1e-4\n")
    with pytest.raises(LorakitError, match=r"mine.yaml: unknown key 'learning_rat'; did you mean 'learning_rate'"):
        load_config(Config, str(p))


def test_print_config_shows_resolved_recipe(capsys):
    assert main(["sft", "--print-config", "max_steps=3", "lora.r=4"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "  r: 4" in out and "data: zh_sft_mix" in out


def test_cli_error_is_one_line_and_exit_2(capsys):
    assert main(["sft", "max_stepz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lorakit sft: error: command line: unknown key 'max_stepz'; did you mean 'max_steps'?"]


def test_every_command_has_help(capsys):
    for name in BY_NAME:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert f"lorakit {name}" in capsys.readouterr().out


# the values issue 18 found training (cutoff_len=-5, max_steps=0), dying in a traceback (batch_size=0) or after the
# model loaded (learning_rate=-1, lora.r=0), one per stage besides
BAD_VALUES = [("sft", "cutoff_len=-5", "[2, inf)"), ("sft", "max_steps=0", "[1, inf)"),
              ("sft", "batch_size=0", "[1, inf)"), ("sft", "learning_rate=-1", "(0, inf)"),
              ("sft", "lora.r=0", "[1, inf)"), ("sft", "eval_fraction=1", "[0, 1)"),
              ("sft", "learning_rate=nan", "(0, inf)"),
              ("rm", "center_rewards=-1", "[0, inf)"), ("dpo", "beta=0", "(0, inf)"),
              ("pretrain", "phase2.learning_rate=-1", "(0, inf)"), ("pretrain", "block_size=1", "[2, inf)"),
              ("ppo", "top_p=0", "(0, 1]"), ("ppo", "gamma=1.5", "[0, 1]")]


@pytest.mark.parametrize("stage,override,valid", BAD_VALUES)
def test_out_of_range_values_fail_before_anything_loads(stage, override, valid, tmp_path, capsys):
    key, value = override.split("=")
    out = tmp_path / "out"
    for extra in (["--print-config"], []):
        # a model that does not exist: the range error must come first, naming the key and its range
        assert main([stage, *extra, "model=/nonexistent/model", f"output_dir={out}", override]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"key '{key}' must be in {valid}, got {value}") and "\n" not in err
    assert not out.exists()


def test_every_numeric_key_has_a_range():
    from lora_kit.recipe import all_keys

    for stage in ("sft", "pretrain", "rm", "dpo", "ppo", "grpo"):
        for key, (f, tp) in all_keys(importlib.import_module(BY_NAME[stage].module).Config).items():
            if tp in (int, float):
                assert "valid" in f.metadata, f"{stage}: {key} has no range"


def test_all_range_problems_are_reported_together(capsys):
    assert main(["sft", "--print-config", "batch_size=0", "lora.dropout=1"]) == 2
    err = capsys.readouterr().err
    assert "'batch_size' must be in [1, inf)" in err and "'lora.dropout' must be in [0, 1)" in err
