"""Where an iteration's experience comes from: the schedule axis (``async_generation``), behind one interface.

    with source.running(start):                      # engines and generator processes up, and always down
        rollout, metrics = source.next_batch(i, stage)   # stages 1-3 of batch i: sampled, scored
        ...                                           # the learner's targets and updates
        metrics |= source.after_update(i + 1, stage)  # the new actor adapter, where the source needs it

* ``SyncSource``: the learner's own process makes each batch with the current actor (``ExperienceMaker``).
* ``AsyncSource``: a generator makes batch i with the actor of update ``i - max_staleness`` while the learner
  trains (``asynchronous.py``): a child process sharing the base on one device, or rank 1 of two processes. The
  learner still computes the critic's values (it owns the critic) and drops any sample staler than the bound.

The trainer calls the same four methods whichever source it has, so its iteration reads straight through.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from . import asynchronous, stages
from .maker import ExperienceMaker
from .rollout import Rollout


def make_source(model, maker: ExperienceMaker, config, accelerator):
    """The source ``config.async_generation`` asks for."""
    return AsyncSource(model, maker, config, accelerator) if config.async_generation else SyncSource(model, maker)


class SyncSource:
    """Stages 1-3 in the learner's process, with the current actor. A vLLM engine starts here, at once, so a model
    the engine cannot run is one line before training."""

    is_generator = False

    def __init__(self, model, maker: ExperienceMaker):
        self.model, self.maker = model, maker
        maker.start_engine(model)

    @property
    def engine(self):
        return self.maker.engine

    @contextmanager
    def running(self, start: int):
        try:
            yield self
        finally:
            self.maker.close_engine()  # the vLLM engine's processes and memory, once sampling is over

    def next_batch(self, iteration: int, stage) -> tuple[Rollout, dict[str, float]]:
        return self.maker.make(self.model, iteration, stage)

    def after_update(self, iteration: int, stage) -> dict[str, float]:
        return {}  # the next batch is made with the updated actor itself

    def stop_early(self, iteration: int) -> None:
        pass


class AsyncSource:
    """Batches from a generator that samples with an older actor while the learner trains (``asynchronous.py``)."""

    engine = None  # the generator starts its own

    def __init__(self, model, maker: ExperienceMaker, config, accelerator):
        processes = accelerator.num_processes
        if processes > 2:
            raise ValueError(f"async_generation runs on 1 process (the generator is its child) or 2 (learner and "
                             f"generator ranks), not {processes}: launch with --num_processes 1 or 2.")
        asynchronous.actor_parameters(model)  # an adapter policy, or a one-line error now
        if processes == 1:  # the generator child will map these; moved now, before anything records addresses
            model.share_memory()
        self.model, self.maker, self.config = model, maker, config
        self.device, self.processes = accelerator.device, processes
        self.is_generator = processes == 2 and accelerator.process_index == 1
        self.channel = None  # the generator's channel, while running

    @contextmanager
    def running(self, start: int):
        """The generator, started at the learner's iteration ``start`` (a resumed run makes exactly the batches it
        has not trained), stopped and reaped on every exit."""
        config = self.config
        previous_threads = torch.get_num_threads()
        if self.processes == 2:
            self.channel = asynchronous.DistributedChannel()
        else:
            threads = 0
            if self.device.type == "cpu":  # the two processes share the cores (cpu_threads_split says how)
                learner_threads, threads = asynchronous.cpu_threads_split()
                torch.set_num_threads(learner_threads)
            self.channel = asynchronous.LocalChannel(self.model, self.maker, start, config.max_iterations,
                                                     config.max_staleness, threads)
        try:
            yield self
        finally:
            self.channel.close()
            self.channel = None
            torch.set_num_threads(previous_threads)

    def next_batch(self, iteration: int, stage) -> tuple[Rollout, dict[str, float]]:
        """The generator's batch ``iteration``, its too-stale samples dropped (and counted); then the learner's
        critic values (PPO), since pi_old came with the batch."""
        with stage("receive"):
            waited = time.perf_counter()
            batch = self.channel.receive_batch()
            rollout = batch.rollout.to(self.device)
            staleness = float((iteration - rollout.policy_version).float().mean())
            kept, dropped = rollout.drop_stale(iteration, self.config.max_staleness)
            if batch.index != iteration or kept is None:  # the schedule rules both out: the two sides disagree
                raise asynchronous.GeneratorFailed(
                    f"the generator sent batch {batch.index} made with policy version {batch.version}; the learner, "
                    f"at iteration {iteration} with max_staleness {self.config.max_staleness}, cannot train on it")
        if self.model.has_critic:
            with stage("score_policy"):
                self.model.eval()
                stages.score_values(self.model, kept)
        return kept, {**batch.metrics, "async/batch": batch.index, "async/policy_version": batch.version,
                      "async/staleness": staleness, "async/dropped_samples": dropped,
                      "async/wait_seconds": time.perf_counter() - waited, "async/generate_seconds": batch.seconds,
                      "async/load_seconds": batch.load_seconds, "async/generator_wait_seconds": batch.wait_seconds}

    def after_update(self, iteration: int, stage) -> dict[str, float]:
        """The new actor adapter (and only that) to the generator, when a batch still to come is scheduled on it."""
        config = self.config
        with stage("sync"):
            if iteration > asynchronous.policy_version_for(config.max_iterations - 1, config.max_staleness):
                return {"async/sync_bytes": 0, "async/sync_seconds": 0.0}  # no batch left uses this version
            started = time.perf_counter()
            vector = asynchronous.adapter_vector(self.model)
            self.channel.send_adapter(iteration, vector)
            return {"async/sync_bytes": vector.numel() * vector.element_size(),
                    "async/sync_seconds": time.perf_counter() - started}

    def stop_early(self, iteration: int) -> None:
        """The learner stopped before ``max_iterations`` (stop_at_kl): a generator rank still running is released."""
        if self.processes == 2:
            self.channel.finish_early(iteration, self.config.max_iterations, self.config.max_staleness,
                                      asynchronous.adapter_vector(self.model))

    def serve(self, start: int) -> None:
        """Rank 1 of an async two-process run: make every batch the learner has not trained yet."""
        try:
            asynchronous.run_generator_rank(self.model, self.maker, asynchronous.DistributedChannel(), start,
                                            self.config.max_iterations, self.config.max_staleness)
        finally:
            self.maker.close_engine()
