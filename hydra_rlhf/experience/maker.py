"""Stages 1-3 of an iteration, for any batch index: which prompts, which sampling seed, generate and score.

``ExperienceMaker`` is plain data (prompt token ids, settings), so the same object serves the synchronous
source and a generator process (``sources.py``, ``asynchronous.py``): batch ``i`` gets the same prompts and the same
sampling seed wherever it is made, and a resumed run makes the batches it has not trained yet.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from . import fusion, stages
from .rollout import Rollout
from ..data import left_pad
from ..layout import FUSED_STAGE


def no_stage(name: str):
    return nullcontext()


@dataclass
class ExperienceMaker:
    prompt_ids: list[list[int]]  # this process's prompts, tokenized
    config: object  # the RLConfig
    generation_kwargs: dict
    eos_token_ids: list[int]  # every token that ends a response
    eos_token_id: int  # the tokenizer's EOS, where the reward head reads a cut-off response
    pad_token_id: int
    rank: int = 0
    device: str = "cpu"
    rows: list[int] | None = None  # the prompt-data row of each of ``prompt_ids`` (default: 0, 1, ...)
    scorer: object = None  # the run's reward sources beyond the head alone (``rewards.RewardScorer``)
    engine: object = None  # generation_backend vllm: this process's VLLMEngine (``start_engine``)

    def __getstate__(self):  # a generator process starts its own engine: an engine does not cross processes
        return {**self.__dict__, "engine": None}

    def start_engine(self, model) -> None:
        """What sampling and scoring need in this process, started once: the vLLM engine on the model's policy
        base (generation_backend vllm), the external reward model (``reward_model_name_or_path``)."""
        if self.config.generation_backend == "vllm" and self.engine is None:
            from .vllm_engine import VLLMEngine

            self.engine = VLLMEngine.for_model(model, self.config, self.eos_token_ids, self.pad_token_id)
        if self.scorer is not None:
            self.scorer.start(self.device)

    def close_engine(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def seed(self, iteration: int, purpose: str) -> int:
        """A function of (seed, iteration, rank): resumes and generator processes reproduce it."""
        offset = {"sample": 0, "shuffle": 1}[purpose]
        return (self.config.seed * 1_000_003 + iteration * 7919 + offset) * 131 + self.rank

    def batch(self, iteration: int) -> list[int]:
        """Batch ``iteration``'s prompts (indices into ``prompt_ids``): a seeded permutation per pass over the data."""
        size, n = self.config.batch_size, len(self.prompt_ids)
        epoch, index = divmod(iteration, n // size)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + epoch)).tolist()
        return order[index * size : (index + 1) * size]

    def prompts(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``iteration``'s prompts, left-padded: (input_ids, attention_mask)."""
        length = self.config.max_prompt_length if self.config.pad_prompts_to_max_length else None
        ids, mask = left_pad([self.prompt_ids[i] for i in self.batch(iteration)], self.pad_token_id, length)
        return ids.to(self.device), mask.to(self.device)

    def reward_scoring(self, iteration: int):
        """``score(rollout, batch_rows)``: the reward sources for rows of batch ``iteration`` (row r of its k x B
        samples is prompt r // k), timing itself into ``score.seconds``; None when the head alone is the reward
        (its score stands as read)."""
        if self.scorer is None:
            return None
        rows = self.rows or list(range(len(self.prompt_ids)))
        prompt_rows = [rows[i] for i in self.batch(iteration)]
        k = self.config.samples_per_prompt

        def score(rollout: Rollout, batch_rows) -> None:
            started = time.perf_counter()
            self.scorer.score(rollout, [prompt_rows[int(r) // k] for r in batch_rows])
            score.seconds += time.perf_counter() - started

        score.seconds = 0.0
        return score

    def make(self, model, iteration: int, stage=no_stage, values: bool = True,
             policy_version: int | None = None) -> tuple[Rollout, dict[str, float]]:
        """Stages 1-3 for batch ``iteration``: sample, score with adapters off, score with the actor (and the
        critic, unless ``values`` is off). With fusion the three overlap and are one profiler stage. With a vLLM
        engine, the actor adapter (learner update ``policy_version``, default ``iteration``) goes to it first.
        Returns the rollout and how it was made (sampling seconds, padding, the fused loop's or the engine's
        counts)."""
        config = self.config
        torch.manual_seed(self.seed(iteration, "sample"))
        prompt_ids, prompt_mask = self.prompts(iteration)
        model.eval()
        score_rewards = self.reward_scoring(iteration)
        if config.fusion:  # finished responses are scored while the longest still decode
            stats = fusion.FusionStats()
            with stage(FUSED_STAGE):
                rollout = fusion.fused_rollout(model, prompt_ids, prompt_mask, self.generation_kwargs,
                                               self.eos_token_ids, config.temperature, self.eos_token_id,
                                               config.fusion_tail_fraction, config.samples_per_prompt, stats, values,
                                               score_rewards)
            return rollout, {**stats.metrics(), **self.reward_metrics(rollout, score_rewards)}
        # step 1. generate: the actor samples k responses for each prompt of a batch (in vLLM: once the engine
        # has the actor adapter of this version)
        if self.engine is not None:
            with stage("sync"):
                self.engine.load_actor(model, iteration if policy_version is None else policy_version)
        started = time.perf_counter()
        with stage("generate"):
            if self.engine is not None:
                rollout = self.engine.generate(prompt_ids, prompt_mask, config.samples_per_prompt,
                                               self.seed(iteration, "sample"))
            else:
                rollout = stages.generate(model, prompt_ids, prompt_mask, self.generation_kwargs, self.eos_token_ids,
                                          samples_per_prompt=config.samples_per_prompt)
        metrics = {"speed/generate_seconds": time.perf_counter() - started}  # either backend, profiled or not
        # step 2. score_frozen: adapters off, one pass gives reference log-probs and the reward head's score; then
        # the other reward sources (functions, an external reward model), weighted with it
        with stage("score_frozen"):
            stages.score_frozen(model, rollout, config.temperature, self.eos_token_id)
            if score_rewards is not None:
                score_rewards(rollout, range(len(rollout.input_ids)))
        # step 3. score_policy: the actor's log-probs at sampling time, and the critic's values (PPO only)
        with stage("score_policy"):
            stages.score_policy(model, rollout, config.temperature, values)
        metrics["score/padded_fraction"] = rollout.padded_fraction()  # the scoring passes' share of padding
        if self.engine is not None:
            metrics.update(self.engine.stats)
        return rollout, {**metrics, **self.reward_metrics(rollout, score_rewards)}

    def resident_tensors(self) -> list[torch.Tensor]:
        """Tensors this maker keeps loaded in this process (the external reward model's), for the profiler."""
        return self.scorer.tensors() if self.scorer is not None else []

    def reward_metrics(self, rollout: Rollout, score_rewards) -> dict[str, float]:
        """Each reward source's mean and spread, and the seconds the sources took (reward functions and the
        external model; the head is read in the adapters-off pass and costs nothing extra)."""
        if score_rewards is None:
            return {}
        return {**self.scorer.metrics(rollout.source_scores), "speed/reward_seconds": score_rewards.seconds}
