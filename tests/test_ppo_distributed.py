"""`lorakit ppo` across two CPU processes (gloo), started by torchrun: each rank rolls out its own slice of every global
batch, both ranks end with bit-identical actor and critic, only rank 0 writes files, a 2-process run resumes exactly,
and with deterministic sampling it trains what one process trains on the global batch.

How the ranks' weights are compared: this file is also the torchrun worker (see `worker`). It runs the real CLI in
each process, then saves what that process holds (actor, critic, value head) and the statistics each PPO step
returned into a directory outside output_dir, where the test reads them.

Tolerance of the 1- vs 2-process comparison: the ranks sum their partial sums (gradients, token counts, whitening
moments) with gloo, while one process sums the same rows in one pass, and the rollouts are padded to a different
width; float32 results agree to rounding (~1e-7 relative). After four AdamW updates at lr 5e-3 the weights differ by
at most 7e-6 (measured; AdamW's 1/sqrt(v) enlarges rounding on entries whose gradient is near zero, as
test_distributed.assert_same_adapter explains), the logged statistics by < 1e-4 relative.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ARGS = ["reward_fn=ppo_rewards:de_share", "dtype=fp32", "max_new_tokens=6", "learning_rate=5e-3", "eval_fraction=0.25",
        "eval_samples=4", "kl_target=4", "kl_horizon=10", "lora.r=4", "logging_steps=1", "seed=3"]


def worker() -> int:
    """Under torchrun: `lorakit <argv>` in this process, then rank<R>.safetensors (its trainable tensors) and
    rank<R>.json (per step: its prompts and the statistics ppo_step returned) into $PPO_RANK_DIR."""
    from safetensors.torch import save_file

    import lora_kit.stages.ppo as ppo
    import lora_kit.stages.ppo.roles as roles_mod
    from lora_kit.cli import main

    made, steps = [], []
    init, step = roles_mod.Roles.__init__, ppo.ppo_step

    def record_roles(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)

    def record_step(*a, **kw):
        row, texts = step(*a, **kw)
        steps.append({"prompts": [p[-1]["content"] for p in a[7]], "row": row})
        return row, texts

    roles_mod.Roles.__init__, ppo.ppo_step = record_roles, record_step
    code = main(sys.argv[1:])
    side, rank = Path(os.environ["PPO_RANK_DIR"]), os.environ["RANK"]
    save_file(made[0].trainable_state(), str(side / f"rank{rank}.safetensors"))
    (side / f"rank{rank}.json").write_text(json.dumps(steps))
    return code


def ragged_batch(rows=6):
    """Values, a ragged response mask and sequence scores: what ppo_step whitens and normalises."""
    g = torch.Generator().manual_seed(0)
    x, scores = torch.randn(rows, 5, generator=g), torch.randn(rows, generator=g)
    mask = (torch.arange(5) < torch.randint(1, 6, (rows, 1), generator=g)).float()
    return x, mask, scores


def stats_worker(side: Path) -> int:
    """Under torchrun: rank r whitens and normalises rows [3r, 3r + 3) of `ragged_batch`, through ppo_core's
    all-reduces."""
    from lora_kit.stages.ppo import core as ppo_core

    rank, world = ppo_core.init_processes()
    x, mask, scores = (t[3 * rank:3 * rank + 3] for t in ragged_batch(3 * world))
    moments = ppo_core.RunningMoments()
    moments.update(scores)
    moments.update(2 * scores + 1)
    torch.save({"whiten": ppo_core.masked_whiten(x, mask), "moments": moments.state_dict(),
                "kl": ppo_core.global_mean((x * mask).sum(-1)), "count": ppo_core.all_sum(mask.sum()).item()},
               side / f"stats{rank}.pt")
    import torch.distributed as dist

    dist.barrier()  # leave together: a rank exiting while gloo still talks to it aborts ("terminate called ...")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(stats_worker(Path(sys.argv[2])) if sys.argv[1] == "--stats" else worker())

# ------------------------------------------------------------------------------------------------------------ tests
from safetensors.torch import load_file  # noqa: E402

from conftest import write_jsonl  # noqa: E402
from lora_kit.cli import main
from test_distributed import AUDIT, assert_same_adapter, rank1_writes  # noqa: E402
from test_ppo import peaked_model_dir, rows  # noqa: E402,F401

pytestmark = pytest.mark.slow
sys.path.insert(0, str(HERE))  # reward_fn=ppo_rewards:... in this process


def prompts(path: Path) -> Path:
    return write_jsonl(path, [{"instruction": f"写一条评价{i}"} for i in range(12)])  # 9 to train, 3 held out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit")
    (audit / "sitecustomize.py").write_text(AUDIT)
    path = os.pathsep.join([str(audit), str(HERE), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, LORAKIT_AUDIT_LOG=str(audit / "writes"), HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def torchrun(args: list[str], env: dict, side: Path) -> list[tuple[dict, list]]:
    """Two processes of `worker` running `lorakit <args>`; returns [rank 0's, rank 1's] (tensors, steps)."""
    side.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           __file__, *args]
    res = subprocess.run(cmd, env=dict(env, PPO_RANK_DIR=str(side)), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return [(load_file(side / f"rank{r}.safetensors"), json.loads((side / f"rank{r}.json").read_text()))
            for r in (0, 1)]


def test_statistics_are_those_of_the_global_batch(tmp_path, env):
    """Whitening, running reward moments and the measured KL on 2 ranks with different token counts equal one
    process's on all rows, identically on both ranks."""
    from lora_kit.stages.ppo import core as ppo_core

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           __file__, "--stats", str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"stats{r}.pt") for r in (0, 1))
    x, mask, scores = ragged_batch()
    assert r0["count"] == r1["count"] == mask.sum() and mask[:3].sum() != mask[3:].sum()  # ragged token counts
    assert torch.allclose(torch.cat([r0["whiten"], r1["whiten"]]), ppo_core.masked_whiten(x, mask), atol=1e-6)
    one = ppo_core.RunningMoments()
    one.update(scores)
    one.update(2 * scores + 1)
    assert r0["moments"] == r1["moments"] and r0["kl"] == r1["kl"]
    assert r0["moments"] == pytest.approx(one.state_dict(), rel=1e-12)
    assert r0["kl"] == pytest.approx((x * mask).sum(-1).mean().item(), rel=1e-6)


def ppo_args(model, data, out, *extra) -> list[str]:
    return ["ppo", f"model={model}", f"data={data}", f"output_dir={out}", *ARGS, *extra]


@pytest.fixture(scope="module")
def two_proc(peaked_model_dir, tmp_path_factory, env):
    """2 processes x 2 prompts per step (mini-batches of 1, so the shuffling RNG matters), 4 steps, checkpoint at 2."""
    root = tmp_path_factory.mktemp("ppo2")
    data, out = prompts(root / "prompts.jsonl"), root / "out"
    ranks = torchrun(ppo_args(peaked_model_dir, data, out, "batch_size=2", "mini_batch_size=1", "max_steps=4",
                              "save_steps=2"), env, root / "ranks")
    return data, out, ranks


def saved(out: Path) -> dict:
    """The output directory's actor, critic and value head, under the names Roles.trainable_state uses."""
    actor = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
             for k, v in load_file(out / "adapter_model.safetensors").items()}
    critic = {k.replace(".lora_A.", ".lora_A.value.").replace(".lora_B.", ".lora_B.value."): v
              for k, v in load_file(out / "value" / "adapter_model.safetensors").items()}
    head = {f"value_head.{k}": v for k, v in load_file(out / "value" / "value_head.safetensors").items()}
    return {**actor, **critic, **head}


def test_ranks_roll_out_their_own_prompts_and_end_identical(two_proc):
    _, out, [(w0, steps0), (w1, steps1)] = two_proc
    assert w0.keys() == w1.keys() and len(steps0) == len(steps1) == 4
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # bit-identical: same summed gradients, same AdamW step
    assert any(t.abs().max() > 1e-4 for k, t in w0.items() if "lora_B" in k)  # training moved B away from zero
    assert saved(out).keys() == w0.keys()
    for k, t in saved(out).items():
        assert torch.equal(t, w0[k]), k  # what rank 0 wrote is what both ranks hold
    for a, b in zip(steps0, steps1):
        assert len(a["prompts"]) == len(b["prompts"]) == 2 and not set(a["prompts"]) & set(b["prompts"])
        assert a["row"] == b["row"]  # every statistic (reward, KL, KL coefficient, losses) was all-reduced
    assert len({r["row"]["kl_coef"] for r in steps0}) > 1  # the adaptive controller moved, identically on both ranks
    train = [r for r in rows(out) if "reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # one writer: no duplicate rows
    assert [{k: v for k, v in r.items() if k not in ("step", "seconds")} for r in train] == [s["row"] for s in steps0]


def test_only_rank_0_writes_files(two_proc, env):
    _, out, _ = two_proc
    assert rank1_writes(env, out) == []  # not even the checkpoint: rank 0 saves every rank's RNG state
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert len(torch.load(ckpt / "state.pt", weights_only=False)["torch_rng"]) == 2
    names = {p.name for p in out.iterdir()}
    assert names >= {"adapter_model.safetensors", "value", "run.json", "metrics.jsonl", "loss.png", "samples.jsonl",
                     "recipe.yaml", "checkpoints"}
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["when"] for s in samples] == ["before"] * 3 + ["after"] * 3  # 3 held-out prompts, shared 2 + 1


def interrupted_copy(src: Path, dst: Path) -> Path:
    """`src` as if killed after step 3: checkpoint-2, metrics up to there, samples from before training."""
    shutil.copytree(src, dst)
    for name in ("run.json", "adapter_model.safetensors", "adapter_config.json", "loss.png"):
        (dst / name).unlink()
    shutil.rmtree(dst / "value")
    samples = (dst / "samples.jsonl").read_text().splitlines()
    (dst / "samples.jsonl").write_text("".join(l + "\n" for l in samples if '"before"' in l))
    return dst


def test_two_process_run_resumes_exactly_through_nproc(two_proc, peaked_model_dir, tmp_path, env):
    data, out, _ = two_proc
    part = interrupted_copy(out, tmp_path / "part")
    args = ppo_args(peaked_model_dir, data, part, "batch_size=2", "mini_batch_size=1", "max_steps=4", "save_steps=2",
                    "resume=true")
    res = subprocess.run([sys.executable, "-m", "lora_kit.cli", args[0], "--nproc", "2", *args[1:]], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "torch.distributed.run" in res.stdout  # went through the launcher
    a, b = saved(out), saved(part)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # each rank's sampling RNG came back from the checkpoint
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(rows(part)) == strip(rows(out))
    assert rank1_writes(env, part) == []


def test_resume_at_another_world_size_is_refused(two_proc, peaked_model_dir, tmp_path, capsys):
    data, out, _ = two_proc
    part = interrupted_copy(out, tmp_path / "part")
    assert main(ppo_args(peaked_model_dir, data, part, "batch_size=4", "mini_batch_size=2", "max_steps=4",
                         "save_steps=2", "resume=true")) == 2
    assert "resume it with --nproc 2" in capsys.readouterr().err


COUNTED = ("clipfrac", "vf_clipfrac")  # PPO statistics that count tokens past a threshold


def test_two_processes_match_one_process_with_the_global_batch(peaked_model_dir, tmp_path, env, monkeypatch):
    """top_k=1 makes sampling deterministic (the ranks' RNG streams differ from one process's); one mini-batch per
    epoch holds the whole global batch, so both runs take the same two updates per step on the same rows."""
    import lora_kit.stages.ppo as ppo

    data = prompts(tmp_path / "prompts.jsonl")
    common = ["top_k=1", "ppo_epochs=2", "max_steps=2", "save_steps=10"]
    ranks = torchrun(ppo_args(peaked_model_dir, data, tmp_path / "two", "batch_size=2", "mini_batch_size=2", *common),
                     env, tmp_path / "ranks")
    real, one_steps = ppo.ppo_step, []

    def record(*a, **kw):
        row, texts = real(*a, **kw)
        one_steps.append({"prompts": [p[-1]["content"] for p in a[7]], "row": row})
        return row, texts

    monkeypatch.setattr(ppo, "ppo_step", record)
    assert main(ppo_args(peaked_model_dir, data, tmp_path / "one", "batch_size=4", "mini_batch_size=4", *common)) == 0
    (_, steps0), (_, steps1) = ranks
    for one, r0, r1 in zip(one_steps, steps0, steps1):
        assert one["prompts"] == r0["prompts"] + r1["prompts"]  # rank r rolls out the r-th slice of the global batch
        assert one["row"].keys() == r0["row"].keys()
        # clip fractions count tokens on either side of a threshold: a last-bit difference between the all-reduce
        # and one process may move a token across it, so they may differ by one token per update (of the mini-batch's
        # response tokens); every continuous value is compared tightly
        one_token = 1 / (one["row"]["response_len"] * 4)
        for k, v in one["row"].items():
            tolerance = dict(abs=one_token + 1e-9) if k in COUNTED else dict(rel=1e-4, abs=1e-6)
            assert r0["row"][k] == pytest.approx(v, **tolerance), k
    assert_same_adapter(saved(tmp_path / "two"), saved(tmp_path / "one"), close=1e-5, entry=1e-4)
    assert any(t.abs().max() > 1e-4 for k, t in saved(tmp_path / "one").items() if "lora_B" in k)
    evals = lambda d: [r[k] for r in rows(d) if "eval_reward" in r for k in ("eval_reward", "eval_kl")]
    assert evals(tmp_path / "two") == pytest.approx(evals(tmp_path / "one"), rel=1e-4, abs=1e-6)
