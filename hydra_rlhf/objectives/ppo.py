"""PPO (Schulman et al., 2017) with a critic, as in the Hydra paper: KL-shaped per-token rewards, GAE, clipped
policy and value losses. The math is in ``hydra_rlhf.objectives.functional``."""

from __future__ import annotations

from . import functional as ppo_math
from .base import Objective, Targets, record


class PPO(Objective):
    def targets(self, rollout, kl_coef, moments):
        """KL penalty at every token plus the score at the last one; GAE; whitening over the batch."""
        config, mask = self.config, rollout.response_mask.float()
        rollout.scores = self.shaped_scores(rollout, moments)
        rollout.rewards, _ = ppo_math.kl_shaped_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask,
                                                       kl_coef)
        advantages, rollout.returns = ppo_math.gae(rollout.rewards, rollout.values, mask, config.gamma, config.lam)
        rollout.advantages = ppo_math.masked_whiten(advantages, mask) if config.whiten_advantages else advantages
        return Targets(rollout, kl_coef)

    def loss(self, model, targets, normalizer, stats):
        """The clipped policy and value losses on one forward each; while the critic warms up
        (``targets.critic_only``), the value loss alone on a critic forward."""
        config, batch = self.config, targets.batch
        mask = batch.response_mask.float()
        if targets.critic_only:
            values, policy_loss = model.values(batch.input_ids, batch.attention_mask, batch.prompt_len), 0.0
        else:
            pg, scores = self.policy_term(model, batch, normalizer, stats, values=True)
            values, policy_loss = scores.values, pg.loss
        vf_loss, vf_clipfrac = ppo_math.value_loss(values, batch.values, batch.returns, mask,
                                                   config.clip_range_value, normalizer)
        record(stats, {"value/loss": vf_loss, "value/clipfrac": vf_clipfrac})
        return policy_loss + config.vf_coef * vf_loss

    def metrics(self, targets):
        batch = targets.batch
        mask = batch.response_mask.float()
        return {
            "objective/non_score_reward": float((batch.rewards.sum(-1) - batch.scores).mean()),
            "value/explained_variance": float(ppo_math.explained_variance(batch.values, batch.returns, mask)),
            "value/mean": float(ppo_math.masked_mean(batch.values, mask)),
        }
