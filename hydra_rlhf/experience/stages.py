"""The stages that fill a ``Rollout``: ``generate`` (stage 1) -> ``score_frozen`` (2) -> ``score_policy`` (3).
Each takes a Rollout and adds to it; an objective (``hydra_rlhf.objectives``) then turns it into its targets. The
samplers (``generate`` here, the fused loop, the vLLM engine) all build their rollout with ``sampled_rollout``."""

from __future__ import annotations

import torch

from .rollout import Rollout


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


def generate(model, prompt_ids, prompt_mask, generation_kwargs: dict, eos_token_ids: list[int], role="policy",
             samples_per_prompt: int = 1) -> Rollout:
    """Stage 1: sample responses with the actor (or another role), mask everything after the first EOS. With k
    ``samples_per_prompt``, each prompt is repeated k times in the one generate call (adjacent rows)."""
    prompt_ids = prompt_ids.repeat_interleave(samples_per_prompt, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(samples_per_prompt, dim=0)
    sequences = model.generate(prompt_ids, prompt_mask, role=role, **generation_kwargs)
    return sampled_rollout(prompt_ids, prompt_mask, sequences[:, prompt_ids.shape[1]:], eos_token_ids,
                           samples_per_prompt)


def sampled_rollout(prompt_ids, prompt_mask, responses, eos_token_ids: list[int], group_size: int) -> Rollout:
    """A Rollout of sampled rows: left-padded prompts, then responses right-padded to the longest, masked after
    their first EOS. Every sampler builds its rollout here (``generate``, the fused loop's chunks, vLLM)."""
    response_mask, has_eos = response_mask_until_eos(responses, eos_token_ids)
    return Rollout(input_ids=torch.cat([prompt_ids, responses], dim=1),
                   attention_mask=torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=1),
                   response_mask=response_mask, has_eos=has_eos, prompt_len=prompt_ids.shape[1],
                   group_size=group_size)


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
def score_policy(model, rollout: Rollout, temperature: float, values: bool = True) -> None:
    """Stage 3: the actor's log-probs at sampling time (no grad), and the critic's values where there is one
    (unless ``values`` is off: an asynchronous generator leaves them to the learner, who owns the critic)."""
    scores = model.policy_scores(rollout.input_ids, rollout.attention_mask, rollout.prompt_len, temperature,
                                 values=values and model.has_critic)
    rollout.logprobs, rollout.values = scores.logprobs, scores.values


@torch.no_grad()
def score_values(model, rollout: Rollout) -> None:
    """The critic's values alone, for a rollout whose log-probs the sampling process recorded (async mode)."""
    rollout.values = model.values(rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
