"""GRPO (Shao et al., 2024, DeepSeekMath): k samples per prompt, advantages normalised within each group, PPO's
clipped ratio against the behaviour log-probs, and KL to the reference as a **loss term** (the k3 estimator,
weighted by ``kl_coef``). No critic.

The loss is a mean over all real tokens of the minibatch (as TRL's ``loss_type: dapo``), not a mean of
per-sequence means: a long response does not count less per token than a short one.
"""

from __future__ import annotations

import torch

from . import functional as ppo_math
from .base import Objective, Targets, broadcast, record


def group_normalized_advantages(scores: torch.Tensor, group_size: int, scale: str = "group",
                                eps: float = 1e-4) -> torch.Tensor:
    """Rows grouped k by k: A_i = (s_i - mean(group)) / (std + eps), std with Bessel's correction (as in the GRPO
    paper's code and TRL): the group's (``scale`` "group"), the whole batch's ("batch"), or no division ("none",
    Dr. GRPO; Liu et al., 2025). A group whose samples all scored the same gets 0."""
    grouped = scores.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred.flatten()
    std = grouped.std(dim=1, keepdim=True) if scale == "group" else scores.std()
    return (centred / (std + eps)).flatten()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman, 2020): exp(d) - d - 1 with d = log pi_ref - log pi.
    Never negative, 0 where the two agree; unbiased for samples from pi."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


class GRPO(Objective):
    def targets(self, rollout, kl_coef, moments):
        rollout.scores = self.shaped_scores(rollout, moments)
        advantages = group_normalized_advantages(rollout.scores, rollout.group_size, self.config.scale_rewards)
        rollout.advantages = broadcast(advantages, rollout.response_mask)
        return Targets(rollout, kl_coef)

    def loss(self, model, targets, normalizer, stats):
        batch = targets.batch
        mask = batch.response_mask.float()
        pg, scores = self.policy_term(model, batch, normalizer, stats)
        kl = ppo_math.token_mean(k3_kl(scores.logprobs, batch.ref_logprobs), mask, normalizer)
        record(stats, {"policy/kl_loss": kl})
        return pg.loss + targets.kl_coef * kl
