"""``Rollout``: one batch of experience, and every operation on it (move, select, concatenate, trim, drop stale
samples). The stages that fill it are in ``stages.py``; the objectives turn it into their targets."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# The (B, R) tensors: one column per response step, trimmed and padded with the responses.
RESPONSE_FIELDS = ("response_mask", "ref_logprobs", "logprobs", "values", "rewards", "advantages", "returns",
                   "engine_logprobs")
SEQUENCE_FIELDS = ("input_ids", "attention_mask")  # (B, P + R): the prompt, then the responses


@dataclass
class Rollout:
    """One batch of experience. P = prompt width (left-padded), R = response width (right-padded). With k
    samples per prompt (``group_size``), the k rows of a prompt are adjacent: rows [g*k, (g+1)*k) are group g."""

    input_ids: torch.Tensor  # (B, P + R) prompt then response tokens
    attention_mask: torch.Tensor  # (B, P + R) 1 on real tokens
    response_mask: torch.Tensor  # (B, R) 1 on real response tokens, up to and including EOS
    has_eos: torch.Tensor  # (B,) bool, the response ended with EOS rather than the length cap
    prompt_len: int  # P
    group_size: int = 1  # k samples per prompt, adjacent rows
    ref_logprobs: torch.Tensor | None = None  # (B, R) log pi_ref(a_t | s_t), adapters off
    raw_scores: torch.Tensor | None = None  # (B,) reward head at the last real token
    logprobs: torch.Tensor | None = None  # (B, R) log pi_old(a_t | s_t), actor at sampling time
    values: torch.Tensor | None = None  # (B, R) V_old(s_t), critic at sampling time (PPO only)
    scores: torch.Tensor | None = None  # (B,) raw scores after EOS penalty, normalisation and clipping
    rewards: torch.Tensor | None = None  # (B, R) PPO: KL-shaped per-token rewards
    advantages: torch.Tensor | None = None  # (B, R) per-token advantages (PPO: GAE; RLOO/GRPO: per sequence)
    returns: torch.Tensor | None = None  # (B, R) PPO: advantages + values, the critic's targets
    policy_version: torch.Tensor | None = None  # (B,) learner updates the sampling actor had seen (async mode)
    engine_logprobs: torch.Tensor | None = None  # (B, R) the vLLM engine's log-probs of its samples (a check)
    source_scores: torch.Tensor | None = None  # (B, S) each reward source's score, NaN where it did not apply

    # ------------------------------------------------------------------------------------------------ views

    @property
    def kl(self) -> torch.Tensor:
        """(B, R) per-token log pi_old - log pi_ref, 0 on padding."""
        return (self.logprobs - self.ref_logprobs) * self.response_mask

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]

    def padded_fraction(self) -> float:
        """The share of the (B, P + R) positions a forward over this batch computes that are padding."""
        return 1 - float(self.attention_mask.sum()) / max(self.attention_mask.numel(), 1)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def _with(self, **tensors) -> "Rollout":
        """A Rollout with the same plain fields (prompt_len, group_size) and these tensors."""
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._tensors()}
        return Rollout(**{**plain, **tensors})

    # ------------------------------------------------------------------------------------------ operations

    def to(self, device) -> "Rollout":
        return self._with(**{name: value.to(device) for name, value in self._tensors().items()})

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows ``index`` of every per-sample tensor (a minibatch)."""
        return self._with(**{name: value[index] for name, value in self._tensors().items()})

    def trimmed(self) -> "Rollout":
        """The same rows without the columns that are padding in every one of them (the left of the prompts, the
        right of the responses): what a length-bucketed micro-batch computes. Equal results, causally."""
        first = int(self.attention_mask[:, : self.prompt_len].any(0).long().argmax())
        width = max(int(self.response_mask.sum(-1).max()), 1)
        trimmed = {}
        for name, value in self._tensors().items():
            if name in SEQUENCE_FIELDS:
                value = value[:, first : self.prompt_len + width]
            elif name in RESPONSE_FIELDS:
                value = value[:, :width]
            trimmed[name] = value
        return self._with(**trimmed, prompt_len=self.prompt_len - first)

    @staticmethod
    def concat(parts: list["Rollout"], pad_token_id: int) -> "Rollout":
        """One Rollout of the rows of ``parts`` (same prompt width and group size), in order; every response
        tensor right-padded to the widest part (token ids with ``pad_token_id``, masks and scores with 0)."""
        first = parts[0]
        width = max(part.response_mask.shape[1] for part in parts)
        merged = {}
        for name in first._tensors():
            pieces = []
            for part in parts:
                value = getattr(part, name)
                offset = first.prompt_len if name in SEQUENCE_FIELDS else 0
                missing = offset + width - value.shape[1] if name in (*SEQUENCE_FIELDS, *RESPONSE_FIELDS) else 0
                fill = pad_token_id if name == "input_ids" else 0
                pieces.append(torch.nn.functional.pad(value, (0, missing), value=fill) if missing else value)
            merged[name] = torch.cat(pieces)
        return first._with(**merged)

    def drop_stale(self, learner_version: int, max_staleness: int) -> tuple["Rollout | None", int]:
        """Drop every group (a prompt's k samples) with a sample staler than ``max_staleness`` learner updates.
        Returns the rest (None if nothing is left) and the number of samples dropped."""
        stale = (learner_version - self.policy_version) > max_staleness
        stale_groups = stale.view(-1, self.group_size).any(-1)
        if not stale_groups.any():
            return self, 0
        dropped = int(stale_groups.sum()) * self.group_size
        if stale_groups.all():
            return None, dropped
        return self.select((~stale_groups).repeat_interleave(self.group_size).nonzero().squeeze(-1)), dropped
