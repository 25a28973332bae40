"""Recipes: YAML files mapped onto a stage's dataclass, with strict `key=value` overrides.

Owns finding recipes by name or path, type coercion, unknown-key errors with close-match hints, and dumping the resolved
recipe. A stage's config is a dataclass built from the shared parts below; field metadata `help` becomes `--help`.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from lora_kit.errors import LorakitError

RECIPE_SOURCE_DIR = Path(__file__).resolve().parents[1] / "recipes"


def arg(default: Any, help: str, valid: Optional[str] = None):
    """A recipe field: its default, the one line shown in `--help` and `lorakit recipes --show`, and for a number its
    valid range in interval notation (`valid="[1, inf)"`, `"(0, 1]"`), checked with the other recipe errors."""
    meta = {"help": help, **({"valid": valid} if valid else {})}
    if valid and not in_range(default, valid):  # a typo in a range fails at import, not in a user's run
        raise ValueError(f"default {default!r} outside its range {valid}")
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def in_range(value, valid: str) -> bool:
    """Whether a number lies in an interval written `[lo, hi]`, `(lo, hi)` or mixed (`inf` for no bound)."""
    low, high = (float(x) for x in valid[1:-1].split(","))
    if valid[0] not in "[(" or valid[-1] not in "])":
        raise ValueError(f"bad range {valid!r}")
    above = value >= low if valid[0] == "[" else value > low
    below = value <= high if valid[-1] == "]" else value < high
    return above and below


def section(cls, help: str):
    """A dataclass field holding a nested recipe section (`lora.r=8` on the command line), with its help."""
    return field(default_factory=cls, metadata={"help": help})


# ---------------------------------------------------------------------------------------------------- shared parts
# ranges used by many keys
GE0, GE1, POSITIVE = "[0, inf)", "[1, inf)", "(0, inf)"
FRACTION = "[0, 1)"  # a held-out share: all held out would leave nothing to train on
NORM = "[0, inf)"  # 0 turns gradient clipping off (transformers' rule)
SEED = "[0, 4294967295]"  # numpy's seeds are 32-bit


@dataclass
class LoraArgs:
    """The `lora.*` recipe section: rank, alpha, dropout and target modules of the adapter."""
    r: int = arg(8, "LoRA rank", GE1)
    alpha: int = arg(16, "LoRA alpha (scaling = alpha / r)", GE1)
    dropout: float = arg(0.05, "LoRA dropout", "[0, 1)")
    target_modules: str = arg("all-linear", "comma-separated module names, or all-linear")


@dataclass
class ModelArgs:
    """Recipe keys shared by every stage for the base model: source, quantization, dtype, template, safety."""
    model: str = arg("smollm2-135m", "alias (smollm2-135m), local directory or hub id")
    quantization: Literal["none", "4bit", "8bit"] = arg("none", "none | 4bit (QLoRA, NF4) | 8bit (LLM.int8)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = arg("auto",
                                                         "compute dtype; auto picks bf16/fp16/fp32 from the hardware")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = arg(False, "run model code shipped with the checkpoint (off unless you trust it)")
    allow_pickle: bool = arg(False, "also load pickle (.bin) weights; safetensors only by default")
    template: str = arg("auto", "prompt template: auto uses the tokenizer's chat template, else a registry name")


@dataclass
class DataArgs:
    """Recipe keys shared by the record-based stages: data source, format, cutoff, packing, held-out share."""
    data: str = arg("", "dataset: file (json/jsonl/parquet/csv), bundled name, or hub dataset id")
    data_format: str = arg("auto", "auto | alpaca | sharegpt | messages")
    cutoff_len: int = arg(512, "maximum tokens per record", "[2, inf)")
    overlong: Literal["truncate", "drop"] = arg("truncate", "what to do with records longer than cutoff_len")
    packing: bool = arg(True, "pack several records per sequence (no attention across records, no padding)")
    max_samples: int = arg(0, "use only the first N records (0 = all)", GE0)
    eval_fraction: float = arg(0.0, "fraction of records held out for evaluation", FRACTION)
    skip_bad_records: bool = arg(False, "skip malformed records (reporting how many) instead of stopping")


@dataclass
class ScheduleArgs:
    """The optimizer schedule: steps, peak learning rate, scheduler, warmup (a stage's, or one pretrain phase's)."""
    max_steps: int = arg(100, "optimizer steps", GE1)
    learning_rate: float = arg(1e-4, "peak learning rate", POSITIVE)
    lr_scheduler: str = arg("cosine", "transformers scheduler name")
    warmup_ratio: float = arg(0.03, "fraction of steps for linear warmup", "[0, 1]")


@dataclass
class RunArgs:
    """Recipe keys of every training run, pretrain included: output_dir, batch, checkpoints, logging, seed, resume."""
    output_dir: str = arg("", "where the adapter, tokenizer, recipe.yaml, run.json, metrics.jsonl and loss.png go "
                              "(pretrain: also its phase1/ and phase2/ sub-runs)")
    save_steps: int = arg(50, "checkpoint every N steps (in each pretrain phase)", GE1)
    logging_steps: int = arg(5, "log metrics every N steps", GE1)
    weight_decay: float = arg(0.0, "AdamW weight decay", GE0)
    batch_size: int = arg(4, "per-device batch size: sequences, packed rows of cutoff_len tokens, or pretrain's blocks",
                          GE1)
    grad_accum: int = arg(1, "gradient accumulation steps", GE1)
    max_grad_norm: float = arg(1.0, "gradient clipping", NORM)
    seed: int = arg(42, "seed for weights init, data order, held-out split and dropout", SEED)
    resume: bool = arg(False, "continue from the newest checkpoint in output_dir (pretrain keeps finished phases)")
    force: bool = arg(False, "overwrite an output_dir that holds a finished run (pretrain: retrain the phases asked)")
    report_to: str = arg("none", "none | tensorboard | wandb (passed to transformers)")


@dataclass
class TrainArgs(RunArgs, ScheduleArgs):
    """Recipe keys shared by the record-based training stages (sft, rm, dpo, ppo, grpo): the run, its schedule, data
    loading and whether a vocabulary-extended base's new token rows train."""
    dataloader_workers: int = arg(0, "dataloader worker processes", GE0)
    train_new_tokens: bool = arg(True, "also train the token rows a vocab-extended base marks as new (embedding, and "
                                       "lm_head when untied)")


# ---------------------------------------------------------------------------------------------------- finding recipes
def recipe_dirs() -> list[Path]:
    """Where recipes are looked up: the source tree's recipes/ first, then the installed package's."""
    dirs = [RECIPE_SOURCE_DIR]
    try:
        dirs.append(Path(str(files("lora_kit.recipes"))))
    except (ModuleNotFoundError, TypeError):
        pass
    return [d for d in dirs if d.is_dir()]


def recipe_header(path: Path) -> tuple[str, str]:
    """(stage, description) from the recipe's first two comment lines: `# lorakit STAGE --recipe NAME`, `# text`."""
    lines = [l[1:].strip() for l in path.read_text(encoding="utf-8").splitlines()[:2] if l.startswith("#")]
    words = lines[0].split() if lines else []
    stage = words[1] if len(words) > 1 and words[0] == "lorakit" else "?"
    return stage, lines[1] if len(lines) > 1 else ""


def list_recipes() -> list[tuple[str, str, str, Path]]:
    """(name, stage, description, path) of every recipe, a source-tree recipe hiding an installed one."""
    seen: dict[str, tuple[str, str, str, Path]] = {}
    for d in recipe_dirs():
        for p in sorted(d.glob("*.yaml")):
            if p.stem not in seen:
                seen[p.stem] = (p.stem, *recipe_header(p), p)
    return sorted(seen.values())


def find_recipe(name_or_path: str) -> Path:
    """A recipe YAML by path or by name, with a close-match hint when the name is unknown."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise LorakitError(f"{p}: recipe file not found")
        return p
    names = {r[0]: r[3] for r in list_recipes()}
    if name_or_path in names:
        return names[name_or_path]
    hint = difflib.get_close_matches(name_or_path, list(names), n=1)
    raise LorakitError(f"unknown recipe '{name_or_path}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
                       + f" (known: {', '.join(sorted(names))})")


# ---------------------------------------------------------------------------------------------------- loading
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value or a command-line string to the field's type, or raise ValueError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        text = str(value) if not isinstance(value, bool) else str(value).lower()
        for choice in args:
            if text == str(choice):
                return choice
        raise ValueError(f"must be one of {' | '.join(map(str, args))}, got '{value}'")
    if origin is list:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [v for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0] if args else str, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"must be true or false, got '{value}'")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"must be an integer, got '{value}'")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ValueError(f"must be an integer, got '{value}'") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got '{value}'")
        try:
            return float(str(value).strip())
        except ValueError:
            raise ValueError(f"must be a number, got '{value}'") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"must be a string, got {type(value).__name__}")
        return "" if value is None else str(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError("must be a mapping")
        return value
    return value


def all_keys(cls, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of a config class mapped to its dataclass field."""
    out = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(all_keys(tp, prefix + f.name + "."))
        else:
            out[prefix + f.name] = (f, tp)
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested recipe dict as dotted keys ({"lora": {"r": 8}} -> {"lora.r": 8}); `*_kwargs` dicts stay values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not k.endswith("_kwargs"):
            out.update(flatten(v, prefix + str(k) + "."))
        else:
            out[prefix + str(k)] = v
    return out


def _unknown(key: str, known: list[str], source: str) -> str:
    hint = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"{source}: unknown key '{key}'" + (f"; did you mean '{hint[0]}'?" if hint else "")


def load_config(cls, recipe: Optional[str] = None, overrides: list[str] | None = None, recipe_path_hint=None):
    """Build `cls` from a recipe (name or path) plus `key=value` overrides. All problems are reported together."""
    keys = all_keys(cls)
    known = list(keys)
    problems: list[str] = []
    values: dict[str, tuple[Any, str]] = {}
    if recipe:
        path = find_recipe(recipe)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise LorakitError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise LorakitError(f"{path}: a recipe must be a mapping of key: value")
        for k, v in flatten(raw).items():
            values[k] = (v, str(path))
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"override '{item}' is not key=value")
            continue
        k, v = item.split("=", 1)
        values[k.strip()] = (v, "command line")
    config = cls()
    for k, (v, source) in values.items():
        if k not in keys:
            problems.append(_unknown(k, known, source))
            continue
        f, tp = keys[k]
        try:
            coerced = _coerce(v, tp, k)
        except ValueError as e:
            problems.append(f"{source}: key '{k}' {e}")
            continue
        valid = f.metadata.get("valid")
        if valid and not in_range(coerced, valid):
            problems.append(f"{source}: key '{k}' must be in {valid}, got {v}")
            continue
        obj = config
        *parents, last = k.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, last, coerced)
    if problems:
        raise LorakitError("; ".join(problems))
    return config


def to_dict(config) -> dict:
    """The resolved recipe as nested plain dicts (what recipe.yaml holds)."""
    return dataclasses.asdict(config)


def dump_yaml(config) -> str:
    """The resolved recipe as YAML in field order, Chinese left unescaped (the text of recipe.yaml)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def describe(cls) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every key, for `--help` and `lorakit recipes --show`."""
    out = []
    default = cls()
    for key, (f, tp) in all_keys(cls).items():
        obj = default
        for p in key.split("."):
            obj = getattr(obj, p)
        origin = typing.get_origin(tp)
        tname = "|".join(map(str, typing.get_args(tp))) if origin is Literal else getattr(tp, "__name__", str(tp))
        valid = f.metadata.get("valid")
        out.append((key, tname, obj, f.metadata.get("help", "") + (f" (valid: {valid})" if valid else "")))
    return out
