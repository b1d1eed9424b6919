"""Experience-making, separate from learning: the ``Rollout`` container and the stages that fill it.

``generate`` -> ``score_frozen`` -> ``score_policy`` -> ``compute_advantages`` each take a Rollout and add to it,
so an asynchronous or off-policy trainer can run them in another order or on another schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from . import ppo_math


@dataclass
class Rollout:
    """One batch of experience. P = prompt width (left-padded), R = response width (right-padded)."""

    input_ids: torch.Tensor  # (B, P + R) prompt then response tokens
    attention_mask: torch.Tensor  # (B, P + R) 1 on real tokens
    response_mask: torch.Tensor  # (B, R) 1 on real response tokens, up to and including EOS
    has_eos: torch.Tensor  # (B,) bool, the response ended with EOS rather than the length cap
    prompt_len: int  # P
    ref_logprobs: torch.Tensor | None = None  # (B, R) log pi_ref(a_t | s_t), adapters off
    raw_scores: torch.Tensor | None = None  # (B,) reward head at the last real token
    logprobs: torch.Tensor | None = None  # (B, R) log pi_old(a_t | s_t), actor at sampling time
    values: torch.Tensor | None = None  # (B, R) V_old(s_t), critic at sampling time
    scores: torch.Tensor | None = None  # (B,) raw scores after EOS penalty, normalisation and clipping
    kl: torch.Tensor | None = None  # (B, R) per-token log pi_old - log pi_ref
    rewards: torch.Tensor | None = None  # (B, R) KL-shaped per-token rewards
    advantages: torch.Tensor | None = None  # (B, R) GAE advantages (whitened if configured)
    returns: torch.Tensor | None = None  # (B, R) advantages + values, the critic's targets

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows ``index`` of every per-sample tensor (a minibatch)."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        return Rollout(**picked)


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and the base's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    generation_eos = getattr(next(iter(model.bases.values())).generation_config, "eos_token_id", None)
    ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    return sorted(i for i in ids if i is not None)


def response_mask_until_eos(responses: torch.Tensor, eos_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, R), has_eos (B,)): 1 up to and including the first EOS; all ones when there is none."""
    is_eos = torch.isin(responses, torch.tensor(eos_token_ids, device=responses.device))
    has_eos = is_eos.any(-1)
    first_eos = torch.where(has_eos, is_eos.long().argmax(-1), torch.full_like(has_eos, responses.shape[1] - 1, dtype=torch.long))
    positions = torch.arange(responses.shape[1], device=responses.device)
    return (positions[None, :] <= first_eos[:, None]).long(), has_eos


def generate(model, prompt_ids, prompt_mask, generation_kwargs: dict, eos_token_ids: list[int], role="policy") -> Rollout:
    """Stage 1: sample responses with the actor (or another role), mask everything after the first EOS."""
    sequences = model.generate(prompt_ids, prompt_mask, role=role, **generation_kwargs)
    prompt_len = prompt_ids.shape[1]
    response_mask, has_eos = response_mask_until_eos(sequences[:, prompt_len:], eos_token_ids)
    return Rollout(
        input_ids=sequences,
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        response_mask=response_mask,
        has_eos=has_eos,
        prompt_len=prompt_len,
    )


@torch.no_grad()
def closed_with_eos(rollout: Rollout, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with one more column: EOS for responses cut off at the length cap, masked
    out for those that ended on their own.

    Why: Hydra-SFT appends EOS to every response (cut-off ones too) and trains the reward head on the hidden
    state there. Read anywhere else, the head is out of its training distribution, and PPO learns to end early
    just to be scored at an EOS (measured on the demo before this: responses shrank from 38 to 13 tokens)."""
    eos = torch.full_like(rollout.input_ids[:, :1], eos_token_id)
    cut_off = (~rollout.has_eos).to(rollout.attention_mask.dtype)[:, None]
    return torch.cat([rollout.input_ids, eos], 1), torch.cat([rollout.attention_mask, cut_off], 1)


def score_frozen(model, rollout: Rollout, temperature: float, eos_token_id: int) -> None:
    """Stage 2: reference log-probs and reward-head scores from one adapters-off pass."""
    input_ids, attention_mask = closed_with_eos(rollout, eos_token_id)
    ref_logprobs, rollout.raw_scores = model.frozen_scores(input_ids, attention_mask, rollout.prompt_len, temperature)
    rollout.ref_logprobs = ref_logprobs[:, :-1]  # the appended EOS is not an action the policy took


@torch.no_grad()
def score_policy(model, rollout: Rollout, temperature: float) -> None:
    """Stage 3: the actor's log-probs and the critic's values at sampling time (no grad)."""
    rollout.logprobs, rollout.values = model.policy_scores(
        rollout.input_ids, rollout.attention_mask, rollout.prompt_len, temperature
    )


def compute_advantages(rollout: Rollout, config, kl_coef: float, moments: ppo_math.RunningMoments) -> None:
    """Stage 4: shape scores, add the per-token KL penalty, run GAE, whiten."""
    mask = rollout.response_mask.float()
    scores = ppo_math.penalize_missing_eos(rollout.raw_scores, rollout.has_eos, config.missing_eos_penalty)
    rollout.scores = ppo_math.normalize_scores(scores, config.reward_normalization, config.reward_clip, moments)
    rollout.rewards, rollout.kl = ppo_math.kl_shaped_rewards(
        rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef
    )
    advantages, rollout.returns = ppo_math.gae(rollout.rewards, rollout.values, mask, config.gamma, config.lam)
    rollout.advantages = ppo_math.masked_whiten(advantages, mask) if config.whiten_advantages else advantages
