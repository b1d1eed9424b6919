"""From sampled tokens to one score per response: the bridge between a ``Rollout`` and the run's reward sources.

The experience maker calls ``RewardScorer.score`` right after the adapters-off pass (which read the Hydra head),
wherever samples are made: the synchronous maker, the fused loop (per finished chunk), the asynchronous
generator's process and the vLLM path. It decodes the completions, hands each reward function the rows' prompts,
completions and data columns in TRL's shapes, reads the external reward model, and writes the weighted sum to
``rollout.raw_scores`` (where the head's score went before: EOS penalty, normalisation and clipping follow as
always) and each source's own score to ``rollout.source_scores``.

The scorer travels to a generator process without its loaded reward model: the model is loaded only in the
process that scores (an asynchronous learner never loads it), and reward functions travel as their specs.
"""

from __future__ import annotations

import torch


def builtin_options(config) -> dict:
    """What the built-in rewards read from the run's config."""
    return {"format_pattern": config.format_pattern, "overlong_buffer": config.overlong_buffer,
            "max_new_tokens": config.max_new_tokens}


class RewardScorer:
    """The run's reward sources over its prompt rows (``data.PromptRows``: prompts, columns, format)."""

    def __init__(self, config, tokenizer, rows):
        from . import check_columns, resolve_reward_functions

        self.config, self.tokenizer = config, tokenizer
        self.prompts = rows.prompts if rows.conversational else rows.texts
        self.columns, self.conversational = rows.columns, rows.conversational
        self.functions = resolve_reward_functions(config.reward_funcs or [], builtin_options(config))
        check_columns(self.functions, list(rows.columns))  # a missing column is one line now, not mid-run
        self.sources = None  # built in the process that scores (``start``)

    def for_rows(self, rows) -> "RewardScorer":
        """The same sources (already loaded) over other prompt rows, e.g. the held-out ones."""
        from . import check_columns

        check_columns(self.functions, list(rows.columns))
        other = object.__new__(RewardScorer)
        other.__dict__.update(self.__dict__)
        other.prompts = rows.prompts if rows.conversational else rows.texts
        other.columns, other.conversational = rows.columns, rows.conversational
        return other

    @staticmethod
    def needed(config) -> bool:
        """Whether a run needs a scorer: any source but the head alone (then the head's score stands as it is)."""
        return bool(config.reward_funcs or config.reward_model_name_or_path)

    def __getstate__(self):  # a generator process loads the reward model itself (functions pickle by their spec)
        return {**self.__dict__, "sources": None}

    def start(self, device) -> None:
        """Load the external reward model (if any) and combine the sources: once, in the process that scores."""
        if self.sources is not None:
            return
        from . import ExternalRewardModel, RewardSources

        config = self.config
        model = None
        if config.reward_model_name_or_path:
            model = ExternalRewardModel(config.reward_model_name_or_path, device=device,
                                        quantization=config.reward_model_quantization)
        self.sources = RewardSources(self.functions, config.reward_weights, head_weight=config.head_weight,
                                     reward_model=model, reward_model_weight=config.reward_model_weight)

    @property
    def names(self) -> list[str]:
        """The sources computed (a weight of 0 turns one off), in the order of ``rollout.source_scores``."""
        return self.sources.names

    def tensors(self) -> list[torch.Tensor]:
        """The external reward model's weights, once loaded (the profiler counts them as resident)."""
        model = self.sources.reward_model if self.sources is not None else None
        return [*model.model.parameters(), *model.model.buffers()] if model is not None else []

    def score(self, rollout, rows: list[int]) -> None:
        """Score ``rollout`` (its rows are the prompt rows ``rows``, one per sample): ``raw_scores`` becomes the
        sources' weighted sum, ``source_scores`` (B, S) each source's score (NaN where it returned None)."""
        if self.sources is None:
            self.start(rollout.input_ids.device)
        texts, ids = self.completions(rollout)
        completions = [[{"role": "assistant", "content": text}] for text in texts] if self.conversational else texts
        columns = {name: [values[row] for row in rows] for name, values in self.columns.items()}
        combined, per_source = self.sources.score(rollout.raw_scores, [self.prompts[row] for row in rows],
                                                  completions, ids, columns)
        device = rollout.raw_scores.device
        rollout.raw_scores = combined.to(device=device, dtype=torch.float32)
        rollout.source_scores = torch.stack([per_source[name].float() for name in self.names], 1).to(device)

    def completions(self, rollout) -> tuple[list[str], list[list[int]]]:
        """Each response's text (special tokens such as EOS dropped) and token ids (up to and including EOS)."""
        ids = [row[mask.bool()].tolist() for row, mask in zip(rollout.responses.cpu(), rollout.response_mask.cpu())]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True), ids

    def metrics(self, source_scores: torch.Tensor) -> dict[str, float]:
        """``reward/<source>/mean`` and ``/std`` over the samples each source applied to, and how many samples no
        source applied to (``RewardSources.metrics``)."""
        from . import RewardSources

        return RewardSources.metrics({name: source_scores[:, i] for i, name in enumerate(self.names)})
