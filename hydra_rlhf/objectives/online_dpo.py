"""Online DPO (Guo et al., 2024): sample two responses per prompt from the current policy, let the Hydra reward
head (adapters off) pick chosen and rejected, and apply the DPO loss (Rafailov et al., 2023) against the
adapters-off reference. No critic; ``dpo_beta`` is DPO's beta. With k > 2 samples, the best and the worst
form the pair. Published as the objective most robust to off-policy (stale) samples (Noukhov et al., 2024).

The reference log-probs are the ones the adapters-off pass already computed in stage 2 (the same pass that
gave the reward), so the loss needs one forward with grad: the policy's, over chosen and rejected together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Objective, Targets, record


def best_and_worst(scores: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped k by k: (chosen rows (G,), rejected rows (G,)), the highest and the lowest score of each group
    (the first of equals; a group whose samples tie gives chosen == rejected, whose loss has zero gradient)."""
    grouped = scores.view(-1, group_size)
    offsets = torch.arange(grouped.shape[0], device=scores.device) * group_size
    return grouped.argmax(dim=1) + offsets, grouped.argmin(dim=1) + offsets


def dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """(G,) -log sigmoid(beta * ((log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected))), from the
    sequence log-ratios (summed over response tokens)."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def sequence_logratios(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sum over real response tokens of log pi - log pi_ref."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


class OnlineDPO(Objective):
    def targets(self, rollout, kl_coef, moments):
        """The rollout's pairs, chosen then rejected, on adjacent rows (2 rows per prompt)."""
        rollout.scores = self.shaped_scores(rollout, moments)
        chosen, rejected = best_and_worst(rollout.scores, rollout.group_size)
        pairs = rollout.select(torch.stack([chosen, rejected], dim=1).flatten())
        pairs.group_size = 2
        return Targets(pairs, kl_coef)

    def normalizer(self, response_mask):
        """A mean over the minibatch's pairs."""
        return torch.tensor(response_mask.shape[0] / 2)

    def loss(self, model, targets, normalizer, stats):
        batch = targets.batch
        mask = batch.response_mask.float()
        logprobs = model.policy_scores(batch.input_ids, batch.attention_mask, batch.prompt_len,
                                       self.config.temperature).logprobs
        logratios = sequence_logratios(logprobs, batch.ref_logprobs, mask).view(-1, 2)
        losses = dpo_loss(logratios[:, 0], logratios[:, 1], self.config.dpo_beta)
        with torch.no_grad():
            margin = self.config.dpo_beta * (logratios[:, 0] - logratios[:, 1])
        record(stats, {"dpo/loss": losses.mean(), "dpo/implicit_reward_margin": margin.mean(),
                       "dpo/implicit_accuracy": (margin > 0).float().mean()})
        return losses.sum() / normalizer

    def metrics(self, targets):
        pairs = targets.batch.scores.view(-1, 2)
        margin = pairs[:, 0] - pairs[:, 1]
        return {"dpo/score_margin": float(margin.mean()), "dpo/tied_pairs": float((margin <= 0).float().mean())}
