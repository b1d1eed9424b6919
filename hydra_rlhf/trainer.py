"""The RL loop on a HydraModel, for every objective: experience -> targets -> learning. ``RLTrainer.step`` is one
iteration, read top to bottom in numbered stages. The experience source (``hydra_rlhf.experience.sources``:
synchronous, or an asynchronous generator) gives stages 1-3; the objective (PPO, RLOO, GRPO, online DPO:
``hydra_rlhf.objectives``) gives the targets of stage 4 and the loss of stage 5; the trainer owns the optimizer,
the logging and when to checkpoint (what a checkpoint holds is ``hydra_rlhf.checkpoints``).

Multi-process (``torchrun`` or ``accelerate launch`` with N processes): every process samples its own prompts;
FSDP2 holds the model (``hydra_rlhf.model.sharding``: whole replicas, or 1/N of the base each with ``sharding
fsdp2``) and averages the gradients in backward, so the adapters stay identical on every rank.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import checkpoints
from .checkpoints import clean_staging, latest_intact_checkpoint
from .data import PromptRows, encode_prompts
from .errors import Interrupted, NonFiniteError, OutOfMemory
from .experience.maker import ExperienceMaker
from .experience.rollout import Rollout
from .experience.sources import make_source
from .experience.stages import eos_token_ids
from .memory.levers import make_optimizer
from .memory.profiler import MemoryProfiler
from .model import sharding
from .objectives import Targets, make_objective
from .objectives import functional as F
from .objectives.base import group_stats
from .rewards.scorer import RewardScorer

if TYPE_CHECKING:
    from .config import RLConfig

logger = logging.getLogger(__name__)


class RLTrainer:
    """The loop, the same for every objective, schedule and sampler."""

    def __init__(self, model, tokenizer, config: RLConfig, prompts, accelerator=None):
        """``prompts``: message lists, or ``data.PromptRows`` (the prompts with their data columns, which reward
        functions read)."""
        from accelerate import Accelerator
        from transformers import get_scheduler

        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.output_dir = Path(config.output_dir)
        # With stop_at_eos off no token ends a response: every sampler keeps it whole, to the length cap.
        self.eos_token_ids = eos_token_ids(tokenizer, model) if config.stop_at_eos else []

        # Data-parallel processes each take their own slice of the prompts; async ranks (learner, generator) share
        # one stream of batches.
        processes = self.accelerator.num_processes
        self.data_parallel = processes > 1 and not config.async_generation
        self.world = processes if self.data_parallel else 1
        rows = prompts if isinstance(prompts, PromptRows) else PromptRows.of(prompts)
        encoded, truncated = encode_prompts(tokenizer, rows.prompts, config.max_prompt_length)
        if truncated:
            logger.info("%d prompts were longer than %d tokens and were cut from the left.", truncated, config.max_prompt_length)
        rank = self.accelerator.process_index if self.data_parallel else 0
        prompt_ids = encoded[rank :: self.world]
        if len(prompt_ids) < config.batch_size:
            raise ValueError(f"Only {len(prompt_ids)} prompts per process, fewer than batch_size {config.batch_size}.")

        # before the optimizer: FSDP2 turns the parameters into DTensors (shards, or replicas it keeps in sync)
        self.sharding = sharding.prepare(model, config, self.world, self.device)
        self.objective = make_objective(config)
        if model.has_critic != self.objective.info.critic:
            raise ValueError(f"objective {config.objective} {'needs' if self.objective.info.critic else 'has no'} "
                             f"critic, but the model was built {'with' if model.has_critic else 'without'} one: "
                             f"build it with HydraModel.from_config(..., critic={self.objective.info.critic}).")
        groups = model.parameter_groups()
        self.trainable = [p for params in groups.values() for p in params]
        learning_rates = {"actor": config.actor_lr, "critic": config.critic_lr}
        self.group_names = list(groups)  # one optimizer group per trainable role; critic-free: the actor's only
        self.optimizer = make_optimizer([{"params": groups[name], "lr": learning_rates[name]} for name in self.group_names],
                                        config.optim, config.weight_decay)
        steps_per_iteration = config.num_epochs * (config.train_rows // config.minibatch_size)
        self.scheduler = get_scheduler(config.lr_scheduler, self.optimizer, num_warmup_steps=config.warmup_steps,
                                       num_training_steps=config.max_iterations * steps_per_iteration)
        self.kl_controller = (
            F.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
            if config.kl_controller == "adaptive" else F.FixedKLController(config.kl_coef)
        )
        self.moments = F.RunningMoments()
        # rows of one training forward: the plan's, halved for the rest of the run after an out-of-memory error
        self.micro_batch = config.minibatch_size // (config.gradient_accumulation_steps or 1)
        self.iteration = 0
        self.nonfinite_in_a_row = 0
        self.recent_kl: list[float] = []  # stop_at_kl's window
        self.reached_kl = False  # stop_at_kl: the KL budget is spent, the run is complete
        generation_kwargs = dict(
            max_new_tokens=config.max_new_tokens, do_sample=True, temperature=config.temperature, top_p=config.top_p,
            top_k=0, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=self.eos_token_ids or None,
        )
        scorer = RewardScorer(config, tokenizer, rows) if RewardScorer.needed(config) else None
        self.experience = ExperienceMaker(prompt_ids, config, generation_kwargs, self.eos_token_ids,
                                          tokenizer.eos_token_id, tokenizer.pad_token_id, rank, str(self.device),
                                          rows=list(range(len(encoded)))[rank :: self.world], scorer=scorer)
        self.source = make_source(model, self.experience, config, self.accelerator)
        if self.accelerator.is_main_process:
            clean_staging(self.output_dir)
        self.profiler = MemoryProfiler(
            self.device, tensors=[*model.parameters(), *model.buffers(), *self.experience.resident_tensors()],
            log_path=(self.output_dir / sharding.memory_log_name(rank)
                      if self.data_parallel or self.accelerator.is_main_process else None),
            enabled=config.profile_memory,
        )
        if self.source.engine is not None:
            self.profiler.engine_bytes = self.source.engine.memory_bytes

    # -------------------------------------------------------------------------------------------- the loop

    def train(self) -> list[dict]:
        """Run (or resume) ``max_iterations`` iterations, or fewer once ``stop_at_kl`` is reached; checkpoint every
        ``save_every`` and at the end."""
        from tqdm.auto import tqdm

        if self.config.resume:
            self.resume()
        if self.source.is_generator:  # rank 1 of an async two-process run: it makes the batches, the learner logs
            self.source.serve(self.iteration)
            return []
        history = []
        bar = tqdm(total=self.config.max_iterations, initial=self.iteration, desc=self.config.objective.upper(),
                   disable=not self.accelerator.is_local_main_process)
        try:
            with self._ctrl_c() as stop, self.source.running(self.iteration):
                while self.iteration < self.config.max_iterations and not self.reached_kl and not stop.is_set():
                    metrics = self.step()
                    history.append(metrics)
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['objective/reward']:.3f}", kl=f"{metrics['objective/kl']:.2f}")
                if self.reached_kl:
                    self.source.stop_early(self.iteration)
        finally:
            bar.close()
        if stop.is_set() and self.iteration < self.config.max_iterations and not self.reached_kl:  # (else done anyway)
            self._stop_after_ctrl_c()
        return history

    @contextmanager
    def _ctrl_c(self):
        """The first Ctrl-C lets the current iteration finish (the loop then stops and saves); a second one stops
        at once, keeping the last checkpoint on disk. Either way the run ends with one line saying how to resume."""
        stop = threading.Event()
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield stop
            return

        def handler(signum, frame):
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()
            logger.warning("Ctrl-C: finishing iteration %d%s; press Ctrl-C again to stop now.", self.iteration + 1,
                           ", then saving a checkpoint" if self.config.save_on_interrupt else "")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield stop
        except KeyboardInterrupt:
            last = latest_intact_checkpoint(self.output_dir)
            raise Interrupted(f"stopped by Ctrl-C during iteration {self.iteration + 1} (dropped); "
                              f"{checkpoints.resume_hint(last)}") from None
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stop_after_ctrl_c(self) -> None:
        last = latest_intact_checkpoint(self.output_dir)
        if self.config.save_on_interrupt and (last is None or last.name != checkpoints.checkpoint_name(self.iteration)):
            last = self.save_checkpoint()
        raise Interrupted(f"stopped by Ctrl-C after iteration {self.iteration} of {self.config.max_iterations}; "
                          f"{checkpoints.resume_hint(last)}")

    def step(self) -> dict:
        """One iteration: experience (stages 1-3), the objective's targets (4), learning (5), logging (6)."""
        config, model, stage = self.config, self.model, self.profiler.stage
        started = time.perf_counter()

        # steps 1-3. experience: 1 generate (the actor samples k responses per prompt), 2 score_frozen (adapters
        # off: reference log-probs and reward in one pass), 3 score_policy (the actor's log-probs, the critic's
        # values); made here, or by an asynchronous generator with an older actor while the learner trained
        rollout, experience_metrics = self.source.next_batch(self.iteration, stage)
        # step 4. advantages: the objective's targets (GAE, group baselines, or chosen/rejected pairs)
        with stage("advantages"):
            targets = self.objective.targets(rollout, self.kl_controller.value, self.moments)
            if self.iteration < config.critic_warmup:  # the critic learns the start policy's values before it moves
                targets = replace(targets, critic_only=True)
            finite = self._all_ranks(torch.isfinite(rollout.scores).all())
        # step 5. train: epochs x minibatches of the objective's loss
        with stage("train"):
            model.train()
            stats = self.learn(targets) if finite else {"train/skipped_nonfinite_updates": 1.0}
            problem = nonfinite_problem(rollout.scores, finite, stats)
        self.iteration += 1
        experience_metrics |= self.source.after_update(self.iteration, stage)  # async: the new actor adapter
        # step 6. log: metrics, KL controller, checkpoint
        with stage("log"):
            metrics = self._metrics(rollout, targets, experience_metrics, stats, time.perf_counter() - started)
            self.kl_controller.update(metrics["objective/kl"], len(rollout.input_ids) * self.world)
            self._log(metrics)
            self._guard_nonfinite(problem)
            self.reached_kl = self._kl_budget_spent(metrics["objective/kl"])
            periodic = config.save_every and self.iteration % config.save_every == 0
            last = config.save_final and (self.iteration == config.max_iterations or self.reached_kl)
            if problem is None and (periodic or last):
                self.save_checkpoint()
        self.profiler.end_iteration(self.iteration)
        return metrics

    def learn(self, targets: Targets) -> dict:
        """Epochs over the objective's targets: shuffled minibatches of whole units (a response, or a DPO pair),
        each one optimizer step; its micro-batches accumulate gradients, each loss already scaled to its share
        of the minibatch mean (``objective.normalizer``), so accumulation changes no token's weight."""
        config, objective = self.config, self.objective
        generator = torch.Generator().manual_seed(self.experience.seed(self.iteration, "shuffle"))
        unit = objective.info.rows_per_unit
        stats = defaultdict(list)
        skipped = 0
        batch = targets.batch
        for _ in range(config.num_epochs):
            order = torch.randperm(len(batch.input_ids) // unit, generator=generator)
            for units in order.split(config.minibatch_size // unit):
                if config.fusion:  # length-bucketed micro-batches: the longest units together
                    units = units[batch.response_mask.sum(-1).view(-1, unit).amax(-1)[units].argsort(descending=True)]
                rows = (units[:, None] * unit + torch.arange(unit)).flatten()
                self._accumulate(targets, rows, stats)
                skipped += not self._optimizer_step(stats, critic_only=targets.critic_only)
        summary = {key: sum(values) / len(values) for key, values in stats.items()}
        summary["train/skipped_nonfinite_updates"] = float(skipped)
        summary["train/micro_batch"] = float(self.micro_batch)
        return summary

    def _accumulate(self, targets: Targets, rows: torch.Tensor, stats: dict) -> None:
        """One minibatch's gradients, in micro-batches of ``self.micro_batch`` rows. Out of memory (what accelerate's
        ``should_reduce_batch_size`` recognises: CUDA, or a CPU allocation that failed): the partial gradients go,
        the micro-batch halves for the rest of the run (accumulation keeps the minibatch, so the step is the same up
        to float order) and the minibatch runs again; below one unit, one ``error:`` line. In one process only: with
        several, the error ends the run (``memory_budget`` then plans for less)."""
        from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

        normalizer = self.objective.normalizer(targets.batch.response_mask[rows])
        unit = self.objective.info.rows_per_unit
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            attempt = defaultdict(list)
            try:
                for micro in rows.split(self.micro_batch):
                    micro_targets = targets.select(micro).trimmed() if self.config.fusion else targets.select(micro)
                    attempt["train/padded_fraction"].append(micro_targets.batch.padded_fraction())
                    self.objective.loss(self.model, micro_targets, normalizer, attempt).backward()
                break
            except RuntimeError as error:
                # several processes run their forwards in step (collectives): one alone cannot start over
                if not should_reduce_batch_size(error) or self.world > 1:
                    raise
            self.optimizer.zero_grad(set_to_none=True)
            clear_device_cache(garbage_collection=True)
            self._halve_micro_batch(unit)
        for key, values in attempt.items():
            stats[key].extend(values)

    def _halve_micro_batch(self, unit: int) -> None:
        half = self.micro_batch // 2 // unit * unit
        if not half:
            raise OutOfMemory(f"out of memory in train at one {'pair' if unit == 2 else 'row'} per micro-batch "
                              f"(iteration {self.iteration + 1}): shorten max_new_tokens or max_prompt_length, turn on "
                              "gradient_checkpointing and logprob_chunk_size, or quantize the base (quantization: "
                              "4bit); `hydra-rlhf estimate` shows what fits.")
        logger.warning("Iteration %d: out of memory in train at micro-batch %d; micro-batch %d (accumulating to "
                       "the same minibatch) from now on.", self.iteration + 1, self.micro_batch, half)
        self.micro_batch = half

    def _optimizer_step(self, stats: dict, critic_only: bool = False) -> bool:
        """Clip, step (FSDP2 averaged the gradients across processes in backward). A non-finite gradient skips the
        step. ``critic_only``: the actor's parameters get no update (with one adapter for actor and critic,
        j-hydra, only the value head learns)."""
        if critic_only:
            for param in self.optimizer.param_groups[self.group_names.index("actor")]["params"]:
                param.grad = None  # AdamW skips a parameter without a gradient: no step, no weight decay
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        if not math.isfinite(grad_norm):  # identical on every rank: the gradients were averaged
            logger.warning("Iteration %d: non-finite gradient norm; update skipped.", self.iteration + 1)
            self.optimizer.zero_grad(set_to_none=True)
            return False
        stats["train/grad_norm"].append(grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    # ------------------------------------------------------------------------------------------- helpers

    def _kl_budget_spent(self, kl: float | None = None) -> bool:
        """stop_at_kl: has the policy's KL to the reference (this iteration's ``kl`` added to the window), averaged
        over the last window of iterations, reached the budget? (The KL is all-reduced across processes first, so
        every rank stops at the same iteration.)"""
        config = self.config
        if config.stop_at_kl is None:
            return False
        self.recent_kl = [*self.recent_kl, *([] if kl is None else [kl])][-config.stop_at_kl_window:]
        mean = sum(self.recent_kl) / len(self.recent_kl)
        if len(self.recent_kl) < config.stop_at_kl_window or mean < config.stop_at_kl:
            return False
        if self.iteration < config.max_iterations:
            logger.info("Iteration %d: KL to the reference %.2f nats (mean of the last %d iterations) reached "
                        "stop_at_kl %.2f; stopping.", self.iteration, mean, len(self.recent_kl), config.stop_at_kl)
        return True

    def _all_ranks(self, flag: torch.Tensor) -> bool:
        flag = flag.float().to(self.device).reshape(1)
        if self.data_parallel:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _metrics(self, rollout: Rollout, targets: Targets, experience: dict, stats: dict, seconds: float) -> dict:
        """The iteration's metrics: the experience (all samples, and how they were made), the objective's targets,
        the learner's stats."""
        lengths = rollout.response_mask.float().sum(-1)
        local = {
            "objective/reward": rollout.raw_scores.mean(),
            "objective/scores": rollout.scores.mean(),
            "objective/kl": rollout.kl.sum(-1).mean(),
            "response/length_mean": lengths.mean(),
            "response/eos_fraction": rollout.has_eos.float().mean(),
        }
        local = {k: float(v) for k, v in local.items()}
        if rollout.engine_logprobs is not None:  # vLLM sampled: its log-probs against the learner's pi_old
            local["engine/logprob_abs_diff"] = float(
                ((rollout.engine_logprobs - rollout.logprobs).abs() * rollout.response_mask).sum()
                / rollout.response_mask.sum().clamp(min=1))
        local.update(experience)
        local.update(group_stats(rollout.raw_scores, rollout.group_size))
        local.update(self.objective.metrics(targets))
        local.update(stats)
        if self.data_parallel:
            values = torch.tensor(list(local.values()), dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.AVG)
            local = dict(zip(local, values.tolist()))
        tokens = float(lengths.sum()) * self.world
        local.update({
            "objective/kl_coef": self.kl_controller.value,
            "response/count": len(lengths) * self.world,  # all processes
            "speed/iteration_seconds": seconds,
            "speed/tokens_per_second": tokens / max(seconds, 1e-9),
            **{f"lr/{name}": group["lr"] for name, group in zip(self.group_names, self.optimizer.param_groups)},
        })
        for name, values in self.profiler.iteration_record.items():
            local[f"memory/{name}_peak_bytes"] = values["peak_bytes"]
        return local

    def _log(self, metrics: dict) -> None:
        self.accelerator.log(metrics, step=self.iteration)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"iteration": self.iteration, **metrics}) + "\n")

    def _guard_nonfinite(self, problem: str | None) -> None:
        """``problem``: None, or what was non-finite this iteration (``nonfinite_problem``)."""
        self.nonfinite_in_a_row = 0 if problem is None else self.nonfinite_in_a_row + 1
        if problem is not None:
            logger.warning("Iteration %d: %s; its updates were skipped.", self.iteration, problem)
        if self.nonfinite_in_a_row >= self.config.max_nonfinite_in_a_row:
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} iterations in a row had non-finite rewards or gradients (the last: "
                f"{problem}); stopping. The last good checkpoint is in {self.output_dir / 'checkpoints'}."
            )

    def trainable_hashes_across_ranks(self) -> list[str]:
        """sha256 of the trainable weights on every rank (all equal when the ranks stayed in sync)."""
        import hashlib

        digest = hashlib.sha256()
        for param in self.trainable:
            whole = sharding.full_tensor(param.detach()).cpu()  # a shard: the whole weight (a collective)
            digest.update(whole.contiguous().view(torch.uint8).numpy().tobytes())
        local = torch.tensor(list(digest.digest()), dtype=torch.uint8, device=self.device)
        gathered = self.accelerator.gather(local[None]) if self.data_parallel else local[None]
        return [bytes(row.tolist()).hex() for row in gathered.cpu()]

    # -------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path | None:
        """Adapters, heads and trainer state, written atomically with their checksums (``checkpoints.py``)."""
        target = None
        trained, state = sharding.trained_state(self.model), self._state_dict()  # every rank: they gather the shards
        if self.accelerator.is_main_process:
            target = checkpoints.save_training_state(self.output_dir, self.iteration, self.model, state, trained)
        if self.data_parallel:
            self.accelerator.wait_for_everyone()
        return target or self.output_dir / "checkpoints" / checkpoints.checkpoint_name(self.iteration)

    def _state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "optimizer": sharding.optimizer_state(self.model, self.optimizer),  # by name, whole: any rank count
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "moments": self.moments.state_dict(),
            "recent_kl": self.recent_kl,
            "config": json.dumps(vars(self.config), default=repr),  # a function in reward_funcs by its repr
        }

    def resume(self) -> bool:
        """Load the newest intact checkpoint in ``output_dir`` (none: start fresh); newer broken ones are named
        and skipped."""
        found = checkpoints.load_training_state(self.output_dir, self.model)
        if found is None:
            logger.info("No checkpoint in %s; starting from scratch.", self.output_dir)
            return False
        checkpoint, state = found
        sharding.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.moments.load_state_dict(state["moments"])
        self.iteration, self.nonfinite_in_a_row = state["iteration"], state["nonfinite_in_a_row"]
        self.recent_kl = state.get("recent_kl", [])
        self.reached_kl = self._kl_budget_spent()  # under this run's budget: a raised one lets a stopped run go on
        logger.info("Resumed from %s (iteration %d).", checkpoint, self.iteration)
        return True


def nonfinite_problem(scores: torch.Tensor, finite: bool, stats: dict) -> str | None:
    """What was non-finite in an iteration, in words for the log and the final error (None: nothing). ``finite``:
    every rank's rewards were finite; ``stats``: ``learn``'s summary (its skipped updates)."""
    if not finite:
        bad = int((~torch.isfinite(scores)).sum())
        where = f"{bad} of {scores.numel()} rewards here" if bad else "on another rank"
        return f"non-finite rewards ({where}: a reward source returned NaN or inf, or the model's scores overflowed)"
    skipped = int(stats["train/skipped_nonfinite_updates"])
    if skipped:
        return f"a non-finite gradient norm in {skipped} update{'s' * (skipped > 1)}"
    return None
