"""PPO math against numbers worked out by hand (in the comments)."""

import math

import pytest
import torch

from hydra_rlhf.objectives import functional as ppo_math
from hydra_rlhf.experience.stages import response_mask_until_eos


def test_kl_shaped_rewards_put_score_on_last_real_token():
    scores = torch.tensor([1.0, 2.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = ppo_math.kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # kl = [[0.5, 0, -1], [0, 1, 0 (padding)]]; rewards = -0.1 * kl, plus the score at the last real token
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [0.0, 1.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 1.1], [0.0, 1.9, 0.0]]))


def test_gae_by_hand():
    # gamma 1, lambda 0.5, V = 0.5 everywhere, reward 1 at the end:
    # delta_2 = 1 + 0 - 0.5 = 0.5 -> A_2 = 0.5; delta_1 = 0 -> A_1 = 0.25; delta_0 = 0 -> A_0 = 0.125
    adv, ret = ppo_math.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3), 1.0, 0.5)
    assert torch.allclose(adv, torch.tensor([[0.125, 0.25, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[0.625, 0.75, 1.0]]))


def test_gae_ignores_values_and_rewards_on_padding():
    # the value 9 on padding must not leak: A_1 = 1 + 0 - 0.5 = 0.5, A_0 = 0 + 0.5 - 0.5 + 0.5 = 0.5
    adv, ret = ppo_math.gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.5, 9.0]]),
                            torch.tensor([[1.0, 1.0, 0.0]]), 1.0, 1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 0.0]]))


def test_gae_discount():
    # gamma 0.5, lambda 1, V = 0: A_1 = 1, A_0 = 0 + 0.5 * 1 = 0.5
    adv, _ = ppo_math.gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), 0.5, 1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 1.0]]))


def test_policy_loss_clips_the_optimistic_side():
    # ratio = [1, 2], A = 1: pg1 = [-1, -2], pg2 = [-1, -1.2] -> max = [-1, -1.2], mean -1.1; clip active on token 2
    out = ppo_math.policy_loss(torch.tensor([[0.0, math.log(2)]]), torch.zeros(1, 2), torch.ones(1, 2),
                               torch.ones(1, 2), clip_range=0.2)
    assert out.loss.item() == pytest.approx(-1.1)
    assert out.clipfrac.item() == pytest.approx(0.5)
    # k3: ((r - 1) - log r) averaged: (0 + (1 - ln 2)) / 2
    assert out.approx_kl.item() == pytest.approx((1 - math.log(2)) / 2)
    assert out.ratio.item() == pytest.approx(1.5)


def test_policy_loss_is_pessimistic_for_negative_advantage():
    # ratio 2, A = -1: pg1 = 2, pg2 = 1.2 -> max keeps the unclipped 2
    out = ppo_math.policy_loss(torch.tensor([[math.log(2)]]), torch.zeros(1, 1), -torch.ones(1, 1),
                               torch.ones(1, 1), clip_range=0.2)
    assert out.loss.item() == pytest.approx(2.0)
    assert out.clipfrac.item() == 0.0


def test_policy_loss_ignores_padding():
    out = ppo_math.policy_loss(torch.tensor([[0.0, 5.0]]), torch.zeros(1, 2), torch.ones(1, 2),
                               torch.tensor([[1.0, 0.0]]), clip_range=0.2)
    assert out.loss.item() == pytest.approx(-1.0)


def test_value_loss_clipped():
    # V = 1, V_old = 0, G = 1, eps 0.2: V_clip = 0.2; losses 0 and 0.64 -> 0.5 * 0.64
    loss, clipfrac = ppo_math.value_loss(torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.32)
    assert clipfrac.item() == 1.0


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert ppo_math.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert ppo_math.explained_variance(torch.zeros(1, 4), returns, mask).item() == pytest.approx(0.0)


def test_masked_whiten():
    # mean 2, unbiased var 1 -> [-1, 0, 1]; the padded 100 neither counts nor survives
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(ppo_math.masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)


def test_adaptive_kl_controller():
    # error clipped to +0.2; 0.1 * (1 + 0.2 * 100 / 10000) = 0.1002
    controller = ppo_math.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(12.0, n_steps=100)
    assert controller.value == pytest.approx(0.1002)
    fixed = ppo_math.FixedKLController(0.1)
    fixed.update(100.0, 100)
    assert fixed.value == 0.1


def test_running_moments_match_the_whole_sample():
    moments = ppo_math.RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([4.0, 5.0]))
    assert moments.mean == pytest.approx(3.0)
    assert moments.var == pytest.approx(2.0)  # population variance of 1..5


def test_score_normalisation_and_clipping():
    batch = ppo_math.normalize_scores(torch.tensor([1.0, 3.0]), "batch", clip=None)
    assert torch.allclose(batch, torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2)]), atol=1e-6)
    clipped = ppo_math.normalize_scores(torch.tensor([-5.0, 0.5, 5.0]), "none", clip=1.0)
    assert clipped.tolist() == [-1.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="none, batch or running"):
        ppo_math.normalize_scores(torch.tensor([1.0]), "bogus", None)


def test_missing_eos_penalty():
    out = ppo_math.penalize_missing_eos(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), 0.5)
    assert out.tolist() == [1.0, 0.5]
    assert ppo_math.penalize_missing_eos(torch.tensor([1.0]), torch.tensor([False]), None).tolist() == [1.0]


def test_response_mask_until_eos():
    mask, has_eos = response_mask_until_eos(torch.tensor([[5, 2, 7], [5, 6, 7], [2, 2, 2]]), [2])
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert has_eos.tolist() == [True, False, True]
