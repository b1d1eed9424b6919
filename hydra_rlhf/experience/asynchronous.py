"""Asynchronous off-policy training (Noukhov et al., "Asynchronous RLHF", arXiv 2410.18252): a generator makes
batch i+1 with an older actor while the learner trains on batch i.

**Schedule.** Batch ``i`` is sampled by the actor after exactly ``max(start, i - max_staleness)`` learner
updates (its *policy version*), so its staleness when trained (the learner has made ``i`` updates by then) is
at most ``max_staleness`` by construction, and a run is as reproducible as a synchronous one: the generator
waits for that version, never uses a newer one. ``max_staleness: 0`` is the synchronous schedule run through
the generator (a test holds it equal to the synchronous loop). The learner still checks every sample's version
and drops (and counts) any group staler than the bound.

**What the generator does.** Stages 1-3 of the iteration for its batch (``ExperienceMaker``): sample; the
adapters-off pass (reference log-probs and reward); the actor's log-probs of its own samples, which are the
behaviour policy's log-probs, pi_old of every ratio-based objective. Only the critic's values are left to the
learner, who owns the critic.

**Two layouts**, one loop (``generate_batches``) behind two channels:

* ``LocalChannel``: one device. The generator is a child process (``torch.multiprocessing``, spawn). The model
  goes to it through torch's tensor sharing (CPU tensors move into shared memory, CUDA tensors go through CUDA
  IPC), so the frozen base exists once; the child then clones the actor adapter, its only private weights.
* ``DistributedChannel``: two processes (``accelerate launch --num_processes 2``, the paper's layout for two
  GPUs): rank 0 learns, rank 1 generates; batches and adapters go over a gloo group of torch.distributed.

**Adapter-only sync.** After each update the learner sends the actor adapter as one flat vector
(``parameters_to_vector``: megabytes; never the base), and logs its bytes and seconds.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .maker import ExperienceMaker
from ..layout import FULL
from .rollout import Rollout

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a waiting side checks that the other is still alive
STOP_VERSION = -1  # sent in place of an adapter version: the learner has ended early (stop_at_kl)


class GeneratorFailed(RuntimeError):
    """The generator stopped with an error, or died; the message names which and why."""


@dataclass
class GeneratedBatch:
    """What the generator sends for one batch."""

    index: int  # the batch (= the learner iteration that trains on it)
    version: int  # learner updates the actor that sampled it had seen
    rollout: Rollout
    seconds: float  # sampling and scoring
    wait_seconds: float  # waiting for the adapter version it needed
    load_seconds: float  # loading that adapter
    metrics: dict  # how it was made (ExperienceMaker.make): sampling seconds, padding, fused or engine counts


@dataclass
class Failure:
    """Sent instead of a batch when the generator raises, so the learner stops with the reason."""

    message: str


def policy_version_for(index: int, max_staleness: int, start: int = 0) -> int:
    """The policy version batch ``index`` is sampled with: ``max_staleness`` updates behind, never before the
    run's (or the resume's) first version."""
    return max(start, index - max_staleness)


def actor_parameters(model) -> list[torch.nn.Parameter]:
    """The actor adapter: the only weights the generator needs from the learner."""
    if model.plan["policy"][1] in (None, FULL):
        raise ValueError(f"async_generation sends only the actor adapter to the generator; mode {model.mode!r} has "
                         "no adapter policy. Use mode hydra, j-hydra or lora.")
    return model.parameter_groups()["actor"]


# ------------------------------------------------------------------------------------------- the generator


def generate_batches(model, maker: ExperienceMaker, channel, start: int, end: int, max_staleness: int) -> None:
    """Make batches ``start .. end - 1``, each with its scheduled policy version, and send them in order (until
    the learner sends ``STOP_VERSION``: it ended early)."""
    actor = actor_parameters(model)
    maker.start_engine(model)  # generation_backend vllm: the generator's own engine
    version = start  # the weights it was handed: the learner's at ``start``
    for index in range(start, end):
        waited = loaded = 0.0
        while version < policy_version_for(index, max_staleness, start):
            began = time.perf_counter()
            version, vector = channel.receive_adapter()
            if version == STOP_VERSION:  # the learner reached its KL budget and took every batch in flight
                return
            received = time.perf_counter()
            vector_to_parameters(vector.to(actor[0].device), actor)
            waited, loaded = waited + received - began, loaded + time.perf_counter() - received
        began = time.perf_counter()
        rollout, metrics = maker.make(model, index, values=False, policy_version=version)
        rollout.policy_version = torch.full((len(rollout.input_ids),), version, device=rollout.input_ids.device)
        channel.send_batch(GeneratedBatch(index, version, rollout, time.perf_counter() - began, waited, loaded,
                                          metrics))


def _generator_process(model, maker, start, end, max_staleness, channel, threads) -> None:
    """The child process of ``LocalChannel``: its own copy of the actor adapter, then the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the learner's: it stops this process itself
    threading.Thread(target=_exit_with_learner, args=(channel.stopping, maker), daemon=True).start()
    if threads:
        torch.set_num_threads(threads)
    try:
        for param in actor_parameters(model):
            param.data = param.data.clone()  # private: the learner updates its own copy in place
        generate_batches(model, maker, channel, start, end, max_staleness)
    except BaseException as error:  # noqa: BLE001 - every failure must reach the learner as one line
        channel.batches.put(Failure(f"{type(error).__name__}: {error}"))
    while True:  # a tensor sent through a queue lives in this process until read: the watchdog ends it
        time.sleep(POLL_SECONDS)


def _exit_with_learner(stopping, maker: ExperienceMaker) -> None:
    """The generator's watchdog: it ends the process within a poll interval of a stop or of the learner's death,
    whatever the generator is doing (mid-batch too); there is nothing of its own to save, but a vLLM engine's
    processes are stopped first (they would outlive it). A plain shared flag, not an Event: an Event's condition
    deadlocks its setter when a waiter was killed."""
    learner = multiprocessing.parent_process()
    while not stopping.value and learner.is_alive():
        time.sleep(POLL_SECONDS)
    try:
        maker.close_engine()
    finally:
        os._exit(0)


class LocalChannel:
    """One device: the generator in a spawned child process, sharing the model's tensors with the learner."""

    def __init__(self, model, maker: ExperienceMaker, start: int, end: int, max_staleness: int, threads: int = 0):
        context = torch.multiprocessing.get_context("spawn")
        self.batches = context.Queue(maxsize=max(1, max_staleness))  # bounded: the generator runs N batches ahead
        self.adapters = context.Queue()
        self.stopping = context.RawValue("b", 0)  # set to 1: the generator ends
        # A vLLM engine starts processes of its own, which a daemonic process may not; the watchdog ends the
        # generator with the learner either way.
        daemon = maker.config.generation_backend != "vllm"
        self.process = context.Process(target=_generator_process, name="hydra-rlhf-generator", daemon=daemon,
                                       args=(model, maker, start, end, max_staleness, self, threads))
        self.process.start()

    def __getstate__(self):  # what the child gets: the queues and the stop flag, not the process handle
        return {k: v for k, v in self.__dict__.items() if k != "process"}

    # learner side
    def receive_batch(self) -> GeneratedBatch:
        while True:
            try:
                item = self.batches.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self.process.is_alive():
                    raise GeneratorFailed(f"the generator process died (exit code {self.process.exitcode}) before "
                                          "sending its next batch") from None
                continue
            if isinstance(item, Failure):
                raise GeneratorFailed(f"the generator process failed: {item.message}")
            return item

    def send_adapter(self, version: int, vector: torch.Tensor) -> None:
        self.adapters.put((version, vector))

    def close(self) -> None:
        """Stop the generator (it may be mid-batch or waiting) and reap it within seconds."""
        self.stopping.value = 1
        self.process.join(timeout=5 if self.process.daemon else 30)  # a vLLM engine takes seconds to shut down
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        for q in (self.batches, self.adapters):
            q.cancel_join_thread()  # never block the learner's exit on unread items
            q.close()

    # generator side (its watchdog ends it if the learner stops or dies while it waits here)
    def receive_adapter(self) -> tuple[int, torch.Tensor]:
        return self.adapters.get()

    def send_batch(self, batch: GeneratedBatch) -> None:
        self.batches.put(batch)


class DistributedChannel:
    """Two processes: rank ``learner`` trains, rank ``generator`` generates. Batches go as objects, adapters as
    one flat tensor; both over a gloo group, so CUDA and CPU runs take the same path (tensors cross on CPU)."""

    def __init__(self, learner: int = 0, generator: int = 1):
        import torch.distributed as dist

        self.dist, self.learner, self.generator = dist, learner, generator
        self.group = dist.new_group(backend="gloo")
        self.pending = []  # the learner's in-flight adapter sends (and their buffers), until delivered
        self.template = None  # the generator's: an adapter vector of the right size and dtype

    def receive_batch(self) -> GeneratedBatch:
        box = [None]
        self.dist.recv_object_list(box, src=self.generator, group=self.group)
        if isinstance(box[0], Failure):
            raise GeneratorFailed(f"the generator (rank {self.generator}) failed: {box[0].message}")
        return box[0]

    def send_adapter(self, version: int, vector: torch.Tensor) -> None:
        # Non-blocking: the generator takes version v only when a batch needs it, while the learner already
        # waits for that batch; a blocking send would deadlock the two.
        self.pending = [(work, buffer) for work, buffer in self.pending if not work.is_completed()]
        for message in (torch.tensor([version]), vector.cpu()):
            self.pending.append((self.dist.isend(message, dst=self.generator, group=self.group), message))

    def finish_early(self, trained: int, end: int, max_staleness: int, vector: torch.Tensor) -> None:
        """The learner stopped after ``trained`` batches of ``end`` (stop_at_kl). The generator may still make
        every batch whose scheduled version it holds (up to ``trained + max_staleness``): take those, unused, so
        its sends complete, then tell it to stop instead of waiting for a version that will never come."""
        in_flight = min(end, trained + max_staleness + 1)
        for _ in range(trained, in_flight):
            self.receive_batch()
        if in_flight < end:
            self.send_adapter(STOP_VERSION, torch.zeros_like(vector))

    def close(self) -> None:
        """Let the adapter sends still in flight finish (after a Ctrl-C the generator may never take them)."""
        from datetime import timedelta

        for work, _ in self.pending:
            try:
                work.wait(timedelta(seconds=5))
            except RuntimeError:
                break
        self.pending = []

    def receive_adapter(self) -> tuple[int, torch.Tensor]:
        version, vector = torch.empty(1, dtype=torch.long), torch.empty_like(self.template)
        self.dist.recv(version, src=self.learner, group=self.group)
        self.dist.recv(vector, src=self.learner, group=self.group)
        return int(version), vector

    def send_batch(self, batch: GeneratedBatch) -> None:
        batch.rollout = batch.rollout.to("cpu")
        self.dist.send_object_list([batch], dst=self.learner, group=self.group)

    def send_failure(self, message: str) -> None:
        self.dist.send_object_list([Failure(message)], dst=self.learner, group=self.group)


def run_generator_rank(model, maker: ExperienceMaker, channel: DistributedChannel, start: int, end: int,
                       max_staleness: int) -> None:
    """The generator rank of a two-process run: the loop, with any error sent to the learner as one line."""
    channel.template = adapter_vector(model).cpu()
    try:
        generate_batches(model, maker, channel, start, end, max_staleness)
    except Exception as error:
        # The learner reports it (one line) and ends the run; this rank ends quietly so the launcher does not
        # tear the learner down before it has said why.
        logger.error("generator rank failed: %s: %s", type(error).__name__, error)
        channel.send_failure(f"{type(error).__name__}: {error}")


def cpu_threads_split() -> tuple[int, int]:
    """(learner, generator) CPU threads when both share this machine's cores: the learner keeps them all, the
    generator gets a quarter (at least one). Measured on 2 cores (the bundled model, the demo's PPO): training
    runs 1.85x faster on 2 threads than on 1, sampling and scoring only 1.2x; a 1 + 1 split made the learner
    the bottleneck and the run 14% slower than synchronous (4 iterations); 2 + 1 took 14% less time than
    synchronous (the demo's 11 iterations)."""
    total = torch.get_num_threads()
    return total, max(1, total // 4)


def adapter_vector(model) -> torch.Tensor:
    """The actor adapter, flattened (a copy: the learner keeps training its own)."""
    return parameters_to_vector(actor_parameters(model)).detach().clone()


