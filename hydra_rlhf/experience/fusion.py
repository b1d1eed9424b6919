"""Sample-level fusion (RLHFuse, Zhong et al., arXiv 2409.13221, on one device): finished samples leave the
generation batch and are scored while the long tail still decodes.

``model.generate`` keeps every row of a batch in every decode step until the longest response ends, and the
scoring stages then pad every row to that longest response. Here a row is *retired* the step it ends (EOS or the
length cap): it leaves the batch and the KV cache (``DynamicCache.batch_select_indices``), so each step computes
only live rows, and retired rows are scored in chunks of similar length (rows retire in order of length, so a
chunk carries little padding; its common left padding is cut too) by the same ``score_frozen`` /
``score_policy`` as the unfused path.

When: retired rows wait until they fill a chunk of ``ceil(fusion_tail_fraction x B)`` rows, so scoring runs
batched; once no more than that many rows are still decoding (the tail), every retired row is scored right
after the step it retired in, so scoring finishes with the tail instead of after it. On one CPU the two
interleave (each decode step, then any ready chunk); nothing overlaps in time, so what fusion saves there is
the computation of finished rows and of padding. Greedy decoding gives exactly the tokens ``generate`` gives;
sampling draws from the same distribution (temperature, then top-p, as ``generate`` processes them) but not
the same random numbers, since finished rows no longer draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layout import fusion_chunk_rows
from ..model.loading import unwrapped
from .rollout import Rollout
from .stages import sampled_rollout, score_frozen, score_policy


@dataclass
class FusionStats:
    """What fusion computed, against what an unfused iteration computes for the same samples."""

    decode_steps: int = 0
    rows_computed: int = 0  # rows in the forward of every decode step, summed (the prefill counts once per row)
    rows_live: int = 0  # rows still decoding at each step, summed: equal to rows_computed when rows retire
    scoring_chunks: int = 0
    scored_positions: int = 0  # (prompt + response) positions the scoring passes computed, per pass
    real_positions: int = 0  # of which real tokens (the rest is padding)
    chunk_sizes: list[int] = field(default_factory=list)

    @staticmethod
    def unfused(rollout: Rollout) -> dict[str, int]:
        """The same counts for ``generate`` + whole-batch scoring of the same samples."""
        lengths = rollout.response_mask.sum(-1)
        return {"rows_computed": len(lengths) * int(lengths.max()), "rows_live": int(lengths.sum()),
                "scored_positions": rollout.attention_mask.numel()}

    def metrics(self) -> dict[str, float]:
        return {"fusion/decode_rows_computed": float(self.rows_computed),
                "fusion/decode_rows_live": float(self.rows_live),
                "fusion/scoring_chunks": float(self.scoring_chunks),
                "score/padded_fraction": 1 - self.real_positions / max(self.scored_positions, 1)}


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float) -> torch.Tensor:
    """(rows,) next tokens from (rows, V) last-position logits, processed as ``generate`` does."""
    if not do_sample:
        return logits.argmax(-1)
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    scores = warpers(None, logits.float())
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


@torch.no_grad()
def decode(causal_lm, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
           eos_token_ids: list[int] | None, do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0,
           stats: FusionStats | None = None):
    """Sample responses, retiring each row the step it ends. Yields, after every step, ``(rows, responses)``:
    the indices (into the batch) of the rows retired in that step and their (n, length) response tokens (EOS
    included). Every row is yielded exactly once."""
    from transformers import DynamicCache

    stats = stats if stats is not None else FusionStats()
    rows = torch.arange(len(prompt_ids), device=prompt_ids.device)
    mask = prompt_mask
    cache = DynamicCache()
    eos = torch.tensor(eos_token_ids or [], device=prompt_ids.device, dtype=torch.long)
    responses = prompt_ids.new_empty((len(prompt_ids), 0))
    inputs, positions = prompt_ids, (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache_kwarg = _cache_keyword(causal_lm)
    for step in range(max_new_tokens):
        logits = causal_lm(input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **{cache_kwarg: cache}).logits[:, -1]
        stats.decode_steps += 1
        stats.rows_computed += len(rows)
        stats.rows_live += len(rows)
        tokens = sample_next(logits, do_sample, temperature, top_p)
        responses = torch.cat([responses, tokens[:, None]], dim=1)
        done = torch.isin(tokens, eos) | (step + 1 == max_new_tokens)
        retired = rows[done], responses[done]
        if done.all():
            del cache  # free the KV cache before the last rows are scored
            yield retired
            return
        if done.any():  # retire: the finished rows leave the batch and the cache, then go to scoring
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, responses, mask, tokens, positions = rows[keep], responses[keep], mask[keep], tokens[keep], positions[keep]
            yield retired
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        inputs, positions = tokens[:, None], positions[:, -1:] + 1


def _cache_keyword(causal_lm) -> str:
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old name warns until 5.40)."""
    import inspect

    forward = unwrapped(causal_lm).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def fused_rollout(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, generation_kwargs: dict,
                  eos_token_ids: list[int], temperature: float, score_eos_token_id: int, tail_fraction: float = 0.2,
                  samples_per_prompt: int = 1, stats: FusionStats | None = None, values: bool = True,
                  score_rewards=None) -> Rollout:
    """Stages 1-3 fused: the actor samples k responses per prompt (retiring rows), and retired rows are scored
    (reference log-probs and reward in one adapters-off pass, then the actor's log-probs and the critic's values)
    in chunks while the rest decode. Returns the Rollout the unfused stages give: the same layout (original row
    order, responses right-padded to the longest), scores equal within float rounding."""
    stats = stats if stats is not None else FusionStats()
    prompt_ids = prompt_ids.repeat_interleave(samples_per_prompt, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(samples_per_prompt, dim=0)
    batch = len(prompt_ids)
    chunk_rows = fusion_chunk_rows(tail_fraction, batch)
    pad = generation_kwargs.get("pad_token_id")
    pad = pad if pad is not None else score_eos_token_id
    scored: list[tuple[torch.Tensor, Rollout]] = []
    pending_rows, pending_responses, live = [], [], batch

    def score_pending() -> None:
        if not pending_rows:
            return
        rows = torch.cat(pending_rows)
        chunk = sampled_rollout(prompt_ids[rows], prompt_mask[rows], _right_pad(pending_responses, pad),
                                eos_token_ids, samples_per_prompt)
        scoring = chunk.trimmed()  # nor the left padding that every prompt of the chunk has
        model.eval()
        score_frozen(model, scoring, temperature, score_eos_token_id)
        if score_rewards is not None:  # the reward sources beyond the head, on the rows of this chunk
            score_rewards(scoring, rows.tolist())
        score_policy(model, scoring, temperature, values)
        chunk.ref_logprobs, chunk.raw_scores = scoring.ref_logprobs, scoring.raw_scores
        chunk.source_scores = scoring.source_scores
        chunk.logprobs, chunk.values = scoring.logprobs, scoring.values
        stats.scoring_chunks += 1
        stats.chunk_sizes.append(len(rows))
        stats.scored_positions += scoring.attention_mask.numel()
        stats.real_positions += int(scoring.attention_mask.sum())
        scored.append((rows, chunk))
        pending_rows.clear()
        pending_responses.clear()

    with model.role("policy") as causal_lm:
        was_training = causal_lm.training
        causal_lm.eval()
        try:
            for rows, responses in decode(causal_lm, prompt_ids, prompt_mask, generation_kwargs["max_new_tokens"],
                                          generation_kwargs.get("eos_token_id"), generation_kwargs.get("do_sample", True),
                                          generation_kwargs.get("temperature", 1.0), generation_kwargs.get("top_p", 1.0),
                                          stats):
                live -= len(rows)
                pending_rows.append(rows)
                pending_responses.extend(responses)
                if sum(map(len, pending_rows)) >= chunk_rows or live <= chunk_rows:
                    score_pending()  # switches roles itself; each role restores the policy adapter on exit
        finally:
            causal_lm.train(was_training)
    score_pending()
    order = torch.cat([rows for rows, _ in scored]).argsort()  # back to the batch's row order
    return Rollout.concat([chunk for _, chunk in scored], pad).select(order)


def _right_pad(responses: list[torch.Tensor], pad: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(responses, batch_first=True, padding_value=pad)
