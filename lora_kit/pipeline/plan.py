"""A pipeline recipe resolved into stages: the stage order, each stage's own command line (its recipe keys or tool
options), how outputs wire into the next stage's inputs, and the fingerprints that decide what is cached.

Everything here is checked before any model loads: unknown stages, stages out of order and keys no stage owns fail
with the stage and key named. Nothing here trains; `pipeline.run` executes the plan.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lora_kit.commands import BY_NAME, stage_module
from lora_kit.data.records import bundled_path
from lora_kit.errors import LorakitError
from lora_kit.models.embedded import ALIASES
from lora_kit.recipe import all_keys, arg, find_recipe, flatten, load_config, to_dict

# The order stages run in; ppo, dpo and grpo share a rank (one of them follows sft).
ORDER = {"extend-vocab": 0, "pretrain": 1, "sft": 2, "rm": 3, "ppo": 4, "dpo": 4, "grpo": 4, "merge": 5, "eval": 6}
ORDER_TEXT = "extend-vocab -> pretrain -> sft -> (rm -> ppo | dpo | grpo) -> merge -> eval"
ADAPTER_STAGES = ("pretrain", "sft", "ppo", "dpo", "grpo")  # train the policy: their adapter becomes the next base
TRAINING = ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")
WIRED = {  # keys the pipeline sets itself, per stage kind; a recipe that sets them is refused
    "recipe": ("model", "output_dir", "resume", "force"),
    "extend-vocab": ("model", "output", "force"),
    "merge": ("model", "adapter", "output", "force"),
}
DATA_KEYS = ("data", "eval_data", "corpus", "heldout", "check_text", "cmmlu")


@dataclass
class EvalSettings:
    """The `eval` stage's keys: the evaluation suite run after every stage (after_each) and on the final model."""
    suite: str = arg("zh", "evaluation suite name (lora_kit.evaluate.suite)")
    limit: int = arg(0, "at most N records per held-out task (0 = all)")
    cmmlu: str = arg("", "directory of CMMLU CSVs for a CMMLU subset (empty = skip)")
    batch_size: int = arg(8, "prompts per generation batch")
    after_each: bool = arg(True, "evaluate after every stage, not only the final model")


@dataclass
class Config:
    """The pipeline recipe: a base model, an output directory and the stages in order."""
    model: str = arg("smollm2-135m", "base model: alias, local directory or hub id")
    output_dir: str = arg("", "OUT: one OUT/<n>-<stage>/ per stage, OUT/report.md and OUT/report.html")
    ablate: str = arg("", "comma-separated stages to leave out in a second branch OUT/without-<stages>/")
    stages: list[dict] = arg([], "the stages in order; each a mapping {stage: {its recipe keys or options}}")


@dataclass
class Stage:
    """One resolved stage: its number and name, its command line and what it reads and writes."""
    index: int
    name: str
    options: dict  # the stage's own keys as given (recipe name under 'recipe')
    argv: list[str] = field(default_factory=list)  # the stage's `lorakit` command line, wired
    resolved: dict = field(default_factory=dict)  # resolved config (recipe stages) or options (tools)
    inputs: dict = field(default_factory=dict)  # role -> Stage index or the base model
    model: str = ""  # the model this stage starts from
    adapter: Optional[str] = None  # the adapter it produces (adapter stages)
    merged: Optional[str] = None  # the intermediate base later stages train on (adapter stages followed by training)
    fingerprint: str = ""

    @property
    def label(self) -> str:
        return f"{self.index}-{self.name}"


@dataclass
class Plan:
    """A validated pipeline: where it writes, the base model and the stages in order."""
    out: Path
    base: str
    stages: list[Stage]
    eval: Optional[EvalSettings]
    base_fingerprint: str
    ablate: list[str]
    source: str

    def stage_dir(self, stage: Stage) -> Path:
        return self.out / stage.label

    def find(self, name: str) -> Stage:
        """The stage called `name`, or an error listing the plan's stages."""
        for s in self.stages:
            if name in (s.name, s.label):
                return s
        raise LorakitError(f"no stage '{name}' in this pipeline (stages: {', '.join(s.name for s in self.stages)})")


# ---------------------------------------------------------------------------------------------------- reading
def read_recipe(recipe: str, overrides: list[str]) -> tuple[Config, str, dict[str, dict], list[str]]:
    """(Config, source, stage overrides, problems) from a pipeline recipe and `key=value` / `stage.key=value`."""
    path = find_recipe(recipe)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LorakitError(f"{path}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise LorakitError(f"{path}: a pipeline recipe must be a mapping with a 'stages' list")
    top = {f.name for f in dataclasses.fields(Config)}
    problems = [_unknown(f"{path}: unknown key '{k}'", k, top) for k in raw if k not in top]
    stage_overrides: dict[str, dict] = {}
    plain = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            problems.append(f"override '{item}' is not key=value")
        elif key.split(".")[0] in ORDER and "." in key:
            stage, _, sub = key.partition(".")
            stage_overrides.setdefault(stage, {})[sub] = value
        elif key in top and key != "stages":
            plain.append(item)
        else:
            problems.append(_unknown(f"command line: unknown key '{key}' (pipeline keys: model, output_dir, ablate; "
                                     "stage keys as STAGE.key=value)", key, top - {"stages"}))
    if problems:
        raise LorakitError("; ".join(problems))
    cfg = load_config(Config, str(path), plain)
    return cfg, str(path), stage_overrides, []


def _unknown(message: str, key: str, known) -> str:
    hint = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.5)
    return message + (f"; did you mean '{hint[0]}'?" if hint else "")


def _stage_entries(cfg: Config, source: str) -> list[tuple[str, dict]]:
    entries = []
    for i, entry in enumerate(cfg.stages, 1):
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise LorakitError(f"{source}: stages[{i}] must be a stage name or one mapping {{stage: {{keys}}}}")
        (name, options), = entry.items()
        entries.append((str(name), dict(options or {})))
    return entries


# ---------------------------------------------------------------------------------------------------- validation
def build_plan(recipe: str, overrides: list[str], *, output_dir: Optional[str] = None,
               ablate: Optional[list[str]] = None) -> Plan:
    """Resolve and validate a pipeline recipe into a Plan (no model is loaded). `ablate` drops stages (a branch)."""
    cfg, source, stage_overrides, _ = read_recipe(recipe, overrides)
    entries = _stage_entries(cfg, source)
    if not entries:
        raise LorakitError(f"{source}: 'stages' is empty; list the stages in order ({ORDER_TEXT})")
    names = [n for n, _ in entries]
    problems = []
    for i, name in enumerate(names, 1):
        if name not in ORDER:
            problems.append(_unknown(f"{source}: stage {i} '{name}' is not a pipeline stage "
                                     f"(stages: {', '.join(ORDER)})", name, ORDER))
    if problems:
        raise LorakitError("; ".join(problems))
    for i in range(1, len(names)):
        if ORDER[names[i]] <= ORDER[names[i - 1]]:
            raise LorakitError(f"{source}: stage {i + 1} '{names[i]}' comes after '{names[i - 1]}'; stages run in the "
                               f"order {ORDER_TEXT}, each at most once")
    for stage in stage_overrides:
        if stage not in names:
            raise LorakitError(f"command line: stage '{stage}' is not in this pipeline ({', '.join(names)})")
    for stage, extra in stage_overrides.items():
        entries[names.index(stage)][1].update(extra)
    drop = [a.strip() for a in (ablate if ablate is not None else []) if a.strip()]
    for a in drop:
        if a not in names:
            raise LorakitError(f"ablate: stage '{a}' is not in this pipeline ({', '.join(names)})")
    if "ppo" in names and "rm" not in [n for n in names if n not in drop] and not entries[names.index("ppo")][1].get(
            "reward_fn"):
        raise LorakitError(f"{source}: stage 'ppo' needs an 'rm' stage before it (or ppo.reward_fn)")
    out = Path(output_dir or cfg.output_dir)
    if not str(out) or str(out) == ".":
        raise LorakitError(f"{source}: output_dir is required (output_dir=DIR)")
    kept = [(n, o) for n, o in entries if n not in drop]
    base = cfg.model
    plan = Plan(out=out.resolve(), base=base, stages=[], eval=None, base_fingerprint=model_fingerprint(base),
                ablate=[a for a in (cfg.ablate.split(",") if cfg.ablate else []) if a.strip()], source=source)
    _wire(plan, kept, source)
    return plan


def _wire(plan: Plan, entries: list[tuple[str, dict]], source: str) -> None:
    """Resolve each stage's command line with its inputs wired from the stages before it; compute fingerprints."""
    model, model_fp = plan.base, plan.base_fingerprint
    adapter: Optional[Stage] = None
    reward: Optional[Stage] = None
    names = [n for n, _ in entries]
    training_after = {i: any(n in TRAINING for n in names[i + 1:]) for i in range(len(names))}
    for i, (name, options) in enumerate(entries):
        stage = Stage(index=i + 1, name=name, options=options)
        where = f"{source}: stage {stage.index} '{name}'"
        out = plan.out / stage.label
        inputs: dict[str, str] = {"model": model_fp}
        if name == "extend-vocab":
            stage.resolved = _tool_options(name, options, where)
            stage.argv = [name, "--model", model, "--output", str(out), *_tool_argv(name, stage.resolved)]
            stage.model = model
            model = str(out)
        elif name in TRAINING:
            recipe = options.pop("recipe", None) or BY_NAME[name].recipe
            options = flatten(options)  # phase1: {max_steps: 5} is phase1.max_steps: 5
            config_cls = stage_module(name).Config
            keys = all_keys(config_cls)
            bad = [k for k in options if k in WIRED["recipe"]]
            if bad:
                raise LorakitError(f"{where}: key '{bad[0]}' is set by the pipeline (wired from the previous stage)")
            unknown = [k for k in options if k not in keys]
            if unknown:
                raise LorakitError(_unknown(f"{where}: key '{unknown[0]}' belongs to no stage here (not a "
                                            f"'{name}' recipe key)", unknown[0], keys))
            sets = {k: _as_override(v) for k, v in options.items()}
            if name == "pretrain" and "extend-vocab" not in names and "phases" not in sets:
                sets["phases"] = "[2]"  # phase 1 trains the rows extend-vocab adds; without it only LoRA trains
            if name == "ppo" and reward is not None and "reward_fn" not in sets:
                sets["reward_adapter"] = str(plan.out / reward.label)
                inputs["reward"] = reward.fingerprint
            elif name == "grpo" and reward is not None and "reward_adapter" not in sets:  # rewards= weighs it (model)
                sets["reward_adapter"] = str(plan.out / reward.label)
                inputs["reward"] = reward.fingerprint
            wired = [f"model={model}", f"output_dir={out}"]
            try:
                resolved = load_config(config_cls, recipe, [f"{k}={v}" for k, v in sets.items()] + wired)
            except LorakitError as e:
                raise LorakitError(f"{where}: {e}") from None
            stage.resolved = {"recipe": recipe, **to_dict(resolved)}
            stage.argv = [name, "--recipe", recipe, *[f"{k}={v}" for k, v in sets.items()], *wired]
            stage.model = model
            if name == "rm":
                reward = stage
            else:
                stage.adapter = str(out)
                adapter = stage
                if training_after[i]:
                    stage.merged = str(out / "merged")
                    model = stage.merged
        elif name == "merge":
            if adapter is None:
                raise LorakitError(f"{where}: nothing to merge (no pretrain, sft, ppo, dpo or grpo stage before it)")
            stage.resolved = _tool_options(name, options, where)
            stage.argv = [name, "--adapter", adapter.adapter, "--model", adapter.model, "--output", str(out),
                          *_tool_argv(name, stage.resolved)]
            stage.model = adapter.model
            inputs["adapter"] = adapter.fingerprint
            model, adapter = str(out), None
        else:  # eval
            unknown = [k for k in options if k not in all_keys(EvalSettings)]
            if unknown:
                raise LorakitError(_unknown(f"{where}: key '{unknown[0]}' belongs to no stage here (not an 'eval' "
                                            "key)", unknown[0], all_keys(EvalSettings)))
            try:
                plan.eval = load_config(EvalSettings, None, [f"{k}={_as_override(v)}" for k, v in options.items()])
            except LorakitError as e:
                raise LorakitError(f"{where}: {e}") from None
            stage.resolved = to_dict(plan.eval)
            stage.model = model
            stage.adapter = adapter.adapter if adapter else None
            if adapter:
                inputs["adapter"] = adapter.fingerprint
        stage.inputs = inputs
        stage.fingerprint = fingerprint(stage, inputs)
        if name in ("extend-vocab", "merge") or (name in ADAPTER_STAGES and stage.merged):
            model_fp = stage.fingerprint
        plan.stages.append(stage)


def _as_override(value: Any) -> str:
    """A YAML value as the `key=value` text the stage's own recipe loader reads back."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def _tool_parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"lorakit {name}", add_help=False)
    stage_module(name).add_arguments(parser)
    return parser


def _tool_options(name: str, options: dict, where: str) -> dict:
    """A tool stage's options (its command-line flags with '_' for '-') checked against its own parser."""
    actions = {a.dest: a for a in _tool_parser(name)._actions if a.option_strings}
    known = [k for k in actions if k not in WIRED[name]]
    out = {}
    for key, value in options.items():
        dest = key.replace("-", "_")
        if dest not in known:
            raise LorakitError(_unknown(f"{where}: key '{key}' belongs to no stage here (not a '{name}' option; "
                                        f"options: {', '.join(known)})", dest, known))
        action = actions[dest]
        values = value if isinstance(value, list) else [value]
        if isinstance(action, argparse._AppendAction):
            if isinstance(value, str) and not isinstance(value, list):
                values = [v for v in value.split(",") if v]
        try:
            conv = [action.type(v) if action.type and isinstance(v, str) else v for v in values]
        except (TypeError, ValueError):
            raise LorakitError(f"{where}: key '{key}' must be {action.type.__name__}, got {value!r}") from None
        if action.choices and any(v not in action.choices for v in conv):
            raise LorakitError(f"{where}: key '{key}' must be one of {' | '.join(map(str, action.choices))}")
        if isinstance(action, argparse._StoreTrueAction):
            conv = [str(v).lower() in ("true", "1", "yes", "on") for v in conv]
        out[dest] = conv if isinstance(action, argparse._AppendAction) else conv[0]
    return out


def _tool_argv(name: str, options: dict) -> list[str]:
    actions = {a.dest: a for a in _tool_parser(name)._actions if a.option_strings}
    argv = []
    for dest, value in options.items():
        flag = actions[dest].option_strings[-1]
        if isinstance(actions[dest], argparse._StoreTrueAction):
            argv += [flag] if value else []
        else:
            for v in value if isinstance(value, list) else [value]:
                argv += [flag, str(v)]
    return argv


# ---------------------------------------------------------------------------------------------------- fingerprints
def fingerprint(stage: Stage, inputs: dict) -> str:
    """Hash of the stage's resolved config (paths of wired inputs replaced by their fingerprints), its inputs'
    fingerprints and the content of every data file it reads."""
    resolved = {k: v for k, v in stage.resolved.items() if k not in ("model", "output_dir", "resume", "force",
                                                                    "reward_adapter", "report_to")}
    payload = {"stage": stage.name, "config": resolved, "inputs": inputs, "data": data_hashes(stage.resolved)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_hashes(resolved: dict) -> dict[str, str]:
    """Content hash of each data file (or directory) a stage's keys name; other sources are identified by name."""
    out = {}
    for key in DATA_KEYS:
        value = resolved.get(key)
        for spec in (value if isinstance(value, list) else str(value or "").split(",")):
            spec = str(spec).strip()
            if spec:
                out[f"{key}:{spec}"] = content_hash(spec)
    return out


def content_hash(spec: str) -> str:
    """sha256 of a file, of every file under a directory, or of a bundled dataset; 'name:' + spec otherwise."""
    path = Path(spec)
    if not path.exists():
        path = bundled_path(spec) or path
    if not path.exists():
        return f"name:{spec}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if f != path else "").encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def model_fingerprint(model: str) -> str:
    """Identity of the base model: alias/path plus its files' names, sizes and modification times (cheap to redo on
    every run; a re-converted or edited model changes it)."""
    path = Path(model).expanduser()
    if model in ALIASES or not path.is_dir():
        return hashlib.sha256(f"model:{model}".encode()).hexdigest()[:16]
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def eval_fingerprint(stage_fp: str, settings: EvalSettings) -> str:
    """Identity of one evaluation column: the model's fingerprint and the suite's settings (after_each aside)."""
    s = {k: v for k, v in to_dict(settings).items() if k != "after_each"}
    return hashlib.sha256(json.dumps([stage_fp, s], sort_keys=True).encode()).hexdigest()[:16]
