"""PPO arithmetic (lora_kit.ppo_core) against hand-computed values."""
import torch

from lora_kit.stages.ppo import core as ppo_core


def test_gae_matches_hand_computation():
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = ppo_core.gae(r, v, m, gamma=1.0, lam=0.5)
    d2 = 1.0 - 0.3
    d1 = 0.0 + 0.3 - 0.4
    d0 = 0.0 + 0.4 - 0.5
    a2, a1 = d2, d1 + 0.5 * d2
    a0 = d0 + 0.5 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0]]))


def test_token_rewards_put_score_on_last_real_token():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = ppo_core.token_rewards(torch.tensor([2.0, 3.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 0.0], [0.0, -1.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 2.0, 0.0], [0.0, 0.1, 3.0]]))


def test_policy_loss_clips_and_counts():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.9]]))
    adv = torch.tensor([[1.0, 1.0]])
    loss, clipfrac, _ = ppo_core.policy_loss(new, old, adv, torch.ones(1, 2), clip_range=0.2)
    assert torch.isclose(loss, torch.tensor(-(1.2 + 0.9) / 2))
    assert clipfrac.item() == 0.5


def test_value_loss_clipped():
    loss, frac = ppo_core.value_loss(torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]),
                                     torch.ones(1, 1), 0.5)
    assert torch.isclose(loss, torch.tensor(0.5 * 1.5 ** 2)) and frac.item() == 1.0


def test_whiten_and_moments():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = ppo_core.masked_whiten(x, m)
    assert abs(ppo_core.masked_mean(w, m).item()) < 1e-6 and w[0, 3] == 0
    rm = ppo_core.RunningMoments()
    rm.update(torch.tensor([1.0, 2.0, 3.0]))
    rm.update(torch.tensor([4.0, 5.0]))
    assert abs(rm.mean - 3.0) < 1e-3 and abs(rm.var - 2.0) < 1e-3


def test_adaptive_kl_controller():
    kl = ppo_core.KLController(0.1, target=6.0, horizon=100)
    kl.update(12.0, n_steps=10)  # error clipped at +0.2
    assert abs(kl.value - 0.1 * 1.02) < 1e-12
    kl.update(0.0, n_steps=10)
    assert kl.value < 0.1 * 1.02
    fixed = ppo_core.KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1


def test_entropy_uniform():
    assert torch.allclose(ppo_core.entropy_from_logits(torch.zeros(1, 1, 8)), torch.log(torch.tensor([[8.0]])))
