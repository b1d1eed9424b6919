"""PPO math as pure tensor functions: no models, no peft, tested against numbers worked out by hand.

Shapes: B prompts, R response steps. ``mask`` (B, R) is 1 for real response tokens (up to and including EOS)
and 0 for padding; every reduction below ignores the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_mean(x: torch.Tensor, mask: torch.Tensor, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``x`` over real tokens divided by ``normalizer``: the token count of the whole minibatch when these
    rows are one micro-batch of it, so that accumulated micro-batches weight every token as one pass would.
    ``None``: this batch's own token count (a plain masked mean)."""
    if normalizer is None:
        return masked_mean(x, mask)
    return (x * mask).sum() / normalizer


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the real tokens; with ``shift_mean=False`` the mean is kept (for returns)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return (whitened if shift_mean else whitened + mean) * mask


def kl_shaped_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * (log pi - log pi_ref)`` at every step, plus the sequence score at the
    last real token. Returns (rewards (B, R), kl (B, R)); both are 0 on padding."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.long().sum(-1).clamp(min=1) - 1  # index of the last real token per row
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, right-padded rows. Returns (advantages, returns), each (B, R).

    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 past the last real token; A_t = delta_t + gamma*lam*A_{t+1}.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, clipped surrogate
    clipfrac: torch.Tensor  # fraction of tokens where the clip was active
    approx_kl: torch.Tensor  # k3 estimator of KL(old || new)
    ratio: torch.Tensor  # mean probability ratio


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float,
    normalizer: float | torch.Tensor | None = None,
) -> PolicyLossOutput:
    """PPO's clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) (the mean
    over ``normalizer`` tokens, see ``token_mean``). PPO, RLOO and GRPO share it."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = token_mean(torch.max(pg_loss1, pg_loss2), mask, normalizer)
    with torch.no_grad():
        clipfrac = masked_mean((pg_loss2 > pg_loss1).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
        mean_ratio = masked_mean(ratio, mask)
    return PolicyLossOutput(loss, clipfrac, approx_kl, mean_ratio)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * mean(max((V - G)^2, (V_clip - G)^2)), V_clip = V_old + clip(V - V_old, +-eps).
    Returns (loss, clipfrac)."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    v_loss1 = (values - returns) ** 2
    v_loss2 = (values_clipped - returns) ** 2
    loss = 0.5 * token_mean(torch.max(v_loss1, v_loss2), mask, normalizer)
    with torch.no_grad():
        clipfrac = masked_mean((v_loss2 > v_loss1).float(), mask)
    return loss, clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(G - V) / Var(G): 1 is a perfect critic, 0 no better than a constant, negative worse."""
    var_returns = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


# ------------------------------------------------------------------------------------------- reward shaping


def penalize_missing_eos(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract ``penalty`` from the score of every response that was cut off before EOS."""
    if penalty is None:
        return scores
    return scores - penalty * (~has_eos).to(scores.dtype)


class RunningMoments:
    """Running mean and std of scores (Chan et al. parallel update), for ``reward_normalization: running``."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        batch_mean, batch_var, n = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def normalize_scores(
    scores: torch.Tensor, mode: str, clip: float | None, moments: RunningMoments | None = None
) -> torch.Tensor:
    """``none``: as is; ``batch``: whiten within the batch; ``running``: by running mean/std. Then clip."""
    if mode == "batch":
        scores = (scores - scores.mean()) / (scores.std() + 1e-8) if scores.numel() > 1 else scores - scores.mean()
    elif mode == "running":
        moments.update(scores)
        scores = (scores - moments.mean) / (moments.var**0.5 + 1e-8)
    elif mode != "none":
        raise ValueError(f"Unknown reward normalization {mode!r}: use none, batch or running.")
    return scores.clamp(-clip, clip) if clip is not None else scores


# ----------------------------------------------------------------------------------------- KL controllers


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): move the coefficient so the measured KL tracks ``target``, at most +-20% of the
    error per ``horizon`` samples."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon
