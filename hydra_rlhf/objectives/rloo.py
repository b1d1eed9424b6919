"""RLOO, REINFORCE leave-one-out (Kool et al., 2019; Ahmadian et al., 2024): k samples per prompt, each
sample's baseline is the mean reward of the other k - 1. No critic.

KL to the reference is a **reward penalty**, as in TRL's RLOO: a sample's reward is its score minus
``kl_coef`` times its summed per-token KL (log pi_old - log pi_ref), so the baseline accounts for it too.
The sequence advantage goes to every token of the response, and the update is PPO's clipped ratio against
the behaviour log-probs (several epochs stay safe). With ``whiten_advantages`` the advantages are divided by
their standard deviation over the batch (their mean is already 0 within every group).
"""

from __future__ import annotations

import torch

from .base import Objective, Targets, broadcast


def rloo_advantages(scores: torch.Tensor, sequence_kl: torch.Tensor, group_size: int, kl_coef: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped k by k. Returns (advantages (B,), rewards (B,)): reward r_i = score_i - kl_coef * KL_i,
    advantage A_i = r_i - mean_{j != i} r_j = k / (k - 1) * (r_i - mean_j r_j)."""
    rewards = scores - kl_coef * sequence_kl
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).flatten(), rewards


class RLOO(Objective):
    def targets(self, rollout, kl_coef, moments):
        rollout.scores = self.shaped_scores(rollout, moments)
        advantages, _ = rloo_advantages(rollout.scores, rollout.kl.sum(-1), rollout.group_size, kl_coef)
        if self.config.whiten_advantages:
            advantages = advantages / (advantages.std() + 1e-8)
        rollout.advantages = broadcast(advantages, rollout.response_mask)
        return Targets(rollout, kl_coef)

    def loss(self, model, targets, normalizer, stats):
        pg, _ = self.policy_term(model, targets.batch, normalizer, stats)
        return pg.loss

    def metrics(self, targets):
        return {"objective/non_score_reward": float(-targets.kl_coef * targets.batch.kl.sum(-1).mean())}
