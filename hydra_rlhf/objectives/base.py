"""What every objective shares: the interface the trainer calls, score shaping, group statistics and the
clipped-ratio policy term of PPO, RLOO and GRPO.

An objective does two things. In stage 4 (``targets``) it turns a scored ``Rollout`` (reference log-probs and
reward from the adapters-off pass, behaviour log-probs from the actor) into ``Targets``: what it learns from
(advantages, or chosen/rejected pairs) and everything its loss needs. In stage 5 (``loss``) it gives the loss of
one micro-batch of those targets. An objective keeps no state between the two: the learner
(``RLTrainer.learn``) runs epochs x minibatches over the targets and owns the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import functional as ppo_math
from ..layout import ObjectiveInfo
from ..experience.rollout import Rollout


@dataclass
class Targets:
    """Stage 4's output, all that stage 5's loss reads: the rows to learn from (the rollout with advantages and
    returns, or its chosen/rejected pairs), the KL coefficient they were made with, and whether only the critic
    learns from them (``critic_warmup``)."""

    batch: Rollout
    kl_coef: float
    critic_only: bool = False  # critic_warmup: the actor does not learn from these targets, the critic does

    def select(self, index: torch.Tensor) -> "Targets":
        return replace(self, batch=self.batch.select(index))

    def trimmed(self) -> "Targets":
        return replace(self, batch=self.batch.trimmed())


class Objective:
    def __init__(self, config, info: ObjectiveInfo):
        self.config, self.info = config, info

    def targets(self, rollout: Rollout, kl_coef: float, moments: ppo_math.RunningMoments) -> Targets:
        """Stage 4: the rollout's targets (its rows may be a reordered subset, e.g. pairs)."""
        raise NotImplementedError

    def normalizer(self, response_mask: torch.Tensor) -> torch.Tensor:
        """What one minibatch's loss is averaged over, from its rows' (m, R) response mask: its real tokens (a
        token-level mean, as one pass over the whole minibatch would take; objectives over pairs override)."""
        return response_mask.float().sum().clamp(min=1)

    def loss(self, model, targets: Targets, normalizer: torch.Tensor, stats: dict) -> torch.Tensor:
        """Stage 5: the loss of one micro-batch (its share of the minibatch mean); appends to ``stats``."""
        raise NotImplementedError

    def metrics(self, targets: Targets) -> dict[str, float]:
        """Objective-specific metrics of the iteration's targets."""
        return {}

    def shaped_scores(self, rollout: Rollout, moments: ppo_math.RunningMoments) -> torch.Tensor:
        """(B,) reward-head scores after the missing-EOS penalty, normalisation and clipping."""
        config = self.config
        scores = ppo_math.penalize_missing_eos(rollout.raw_scores, rollout.has_eos, config.missing_eos_penalty)
        return ppo_math.normalize_scores(scores, config.reward_normalization, config.reward_clip, moments)

    def policy_term(self, model, batch: Rollout, normalizer, stats: dict, values: bool = False):
        """The clipped-ratio surrogate against the behaviour log-probs (PPO, RLOO, GRPO). Returns
        (PolicyLossOutput, PolicyScores) so a caller can add its own terms on the same forward."""
        config, mask = self.config, batch.response_mask.float()
        scores = model.policy_scores(batch.input_ids, batch.attention_mask, batch.prompt_len, config.temperature,
                                     entropy=True, values=values)
        pg = ppo_math.policy_loss(scores.logprobs, batch.logprobs, batch.advantages, mask, config.clip_range,
                                  normalizer)
        record(stats, {"policy/loss": pg.loss, "policy/clipfrac": pg.clipfrac, "policy/approx_kl": pg.approx_kl,
                       "policy/ratio": pg.ratio, "policy/entropy": ppo_math.masked_mean(scores.entropy, mask)})
        return pg, scores


def record(stats: dict, values: dict) -> None:
    """Append each value (a tensor or a number) to ``stats[key]`` as a float."""
    for key, value in values.items():
        stats[key].append(float(value.detach()) if isinstance(value, torch.Tensor) else float(value))


def group_stats(scores: torch.Tensor, group_size: int) -> dict[str, float]:
    """Spread of the scores within each prompt's k samples (rows grouped k by k): the mean within-group standard
    deviation (population, over the k samples) and the share of groups whose samples all scored the same (a
    group baseline gives them no signal)."""
    if group_size < 2:
        return {}
    std = scores.view(-1, group_size).std(dim=1, unbiased=False)
    return {"group/reward_std": float(std.mean()), "group/zero_spread_fraction": float((std < 1e-6).float().mean())}


def broadcast(per_sequence: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) per-sequence values -> (B, R) on every real response token, 0 on padding."""
    return per_sequence[:, None] * response_mask.float()
