"""PPO arithmetic as pure tensor functions: log-probs and entropy from logits, KL-penalised per-token rewards, GAE,
clipped policy/value losses, masked whitening, running reward statistics and the KL controllers (Ziegler et al. 2019).

Written by hand because TRL 1.16 has no PPO trainer (not even in trl.experimental); `stages/ppo/__init__.py` drives
these on LoRA adapters.
All tensors are [batch, response_len] with a 0/1 `mask` over real response tokens.

Across processes (torchrun): each rank holds its own rows; every statistic that decides something (whitening, reward
normalisation, the KL controller's measured KL, loss denominators) is a sum all-reduced over the ranks (`all_sum`, an
identity in one process), so every rank computes the numbers one process would compute on the whole global batch.
"""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import PartialState

from lora_kit.errors import LorakitError
from lora_kit.models.load import device, sharded_by_fsdp


# ---------------------------------------------------------------------------------------------------- processes
def _group() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if _group() else (0, 1)


def init_processes() -> tuple[int, int]:
    """Join the process group under torchrun (WORLD_SIZE > 1) the way the Trainer does for the other stages:
    accelerate's PartialState, with gloo on CPU (training.training_arguments' ddp_backend). Returns (rank, world
    size)."""

    if sharded_by_fsdp() or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        raise LorakitError("ppo runs data-parallel only (each process holds the whole model); launch it with --nproc "
                           "or torchrun, without a DeepSpeed or FSDP config")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _group():
        cpu = device() == "cpu"
        PartialState(cpu=cpu, backend="gloo" if cpu else None)
    return world()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the ranks (a detached copy; `x` itself in one process, where it is returned unchanged)."""
    if not _group():
        return x

    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    y = x.detach().to(comm, copy=True)
    dist.all_reduce(y)
    return y.to(x.device)


def all_gather(obj) -> list:
    """One picklable object from each rank, in rank order (`[obj]` in one process)."""
    if not _group():
        return [obj]

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def global_mean(x: torch.Tensor) -> float:
    """Mean of all elements of `x` on all ranks."""
    s = all_sum(torch.stack([x.double().sum(), torch.tensor(float(x.numel()), dtype=torch.float64)]))
    return (s[0] / s[1]).item()


# ---------------------------------------------------------------------------------------------------- maths
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, count=None) -> torch.Tensor:
    """Mean over the masked entries; `count` replaces the local mask sum as denominator (the token count of the whole
    global batch, so that summing this over the ranks gives the global mean)."""
    if dim is None:
        return (x * mask).sum() / (mask.sum() if count is None else count).clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten with the mean and variance of the masked entries of all ranks (two passes, like one process)."""
    count = all_sum(mask.sum()).clamp(min=1)
    mean = all_sum((x * mask).sum()) / count
    var = all_sum(((x - mean) ** 2 * mask).sum()) / count
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) for each position: logits [B, T, V], tokens [B, T] -> [B, T] (computed in fp32)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at every position (nats), computed in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, T], kl [B, T]): −kl_coef·(log π − log π_ref) at every response token, plus the sequence score on
    its last real token (InstructGPT's objective, as a per-token reward for GAE)."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(-1) * mask).argmax(-1)  # index of the last real token in each row
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over masked tokens -> (advantages, returns)."""
    values = values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    returns = adv + values
    return adv * mask, returns * mask


def policy_loss(logp, old_logp, advantages, mask, clip_range: float,
                count=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate -> (loss, clip fraction, approx KL(old || new)); `count` as in masked_mean."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, count=count)
    clipfrac = masked_mean((clipped > unclipped).float(), mask, count=count)
    approx_kl = 0.5 * masked_mean((logp - old_logp) ** 2, mask, count=count)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip_range: float, count=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (the larger of clipped/unclipped squared errors) -> (loss, clip fraction)."""
    clipped_v = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err, err_clipped = (values - returns) ** 2, (clipped_v - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask, count=count)
    return loss, masked_mean((err_clipped > err).float(), mask, count=count).detach()


class RunningMoments:
    """Running mean/std of sequence scores (Chan et al. parallel update) for reward normalisation; each update takes
    the scores of all ranks."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        n = int(all_sum(torch.tensor(float(x.numel()), dtype=torch.float64)).item())
        mean = all_sum(x.sum()).item() / n
        var = all_sum(((x - mean) ** 2).sum()).item() / n
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + var * n + delta ** 2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, d: dict) -> None:
        self.mean, self.var, self.count = d["mean"], d["var"], d["count"]


class KLController:
    """Adaptive (Ziegler et al. 2019: coef *= 1 + clip(KL/target − 1, ±0.2)·n/horizon) or fixed KL coefficient."""

    def __init__(self, init: float, target: float = 0.0, horizon: int = 10000):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        self.value, self.target, self.horizon = d["value"], d["target"], d["horizon"]
