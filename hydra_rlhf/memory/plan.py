"""``levers: auto``: before the first step, the fastest memory levers that fit the memory a run has, chosen from
the estimate of its shape (``formulas.estimate``), with ``HEADROOM`` to spare.

The levers turn on in the order of what they cost in time, each one kept only where it lowers the estimate:

1. log-prob chunks (``logprob_chunk_size``: the vocabulary-sized logits never exist whole; same results, about
   free), first ``CHUNK_SIZES[0]`` tokens, then ``CHUNK_SIZES[1]``;
2. gradient checkpointing (the forward is recomputed in backward: +15-35% per iteration on a CPU);
3. activation offload (CUDA only: saved activations wait in pinned host memory);
4. a smaller micro-batch with more ``gradient_accumulation_steps``: the optimizer still sees the same minibatch, so
   the result is the same up to the order of float sums; each halving costs the most time.

The first plan in that order whose estimate fits is the run's; a lever the user set by hand (any value, off
included) stays as set. Nothing fitting is a one-line ``ValueError`` naming the smallest memory, or the largest
batch, that would fit. Torch-free, like the estimator: ``available_memory`` imports torch only to ask a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import AUTO_LEVERS, parse_bytes
from .formulas import estimate
from .shape import GiB, EstimateSettings, ModelShape

logger = logging.getLogger(__name__)

OFF = {"logprob_chunk_size": 0, "gradient_checkpointing": False, "activation_offload": False,
       "gradient_accumulation_steps": 1}
CHUNK_SIZES = (256, 64)  # tokens per log-prob chunk: 256 x a 128k vocabulary is 128 MiB of fp32 logits
HEADROOM = 0.10  # of the budget, left free: allocator fragmentation, the tokenizer, what the estimate does not see


def usable(budget_bytes: int) -> int:
    """What a plan may fill of ``budget_bytes``: all but ``HEADROOM``."""
    return int(budget_bytes * (1 - HEADROOM))


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class Plan:
    """The levers a run uses, and why: the budget it had, where that figure came from, the estimate they give."""

    levers: dict  # the four AUTO_LEVERS, as the run uses them
    chosen: tuple  # those that auto turned on, in order
    fixed: tuple  # those the user set by hand
    estimate_bytes: int
    budget_bytes: int
    budget_source: str  # memory_budget, free CUDA memory, available RAM, a card's name
    micro_batch: int
    minibatch: int

    @property
    def usable_bytes(self) -> int:
        return usable(self.budget_bytes)

    def describe_levers(self) -> str:
        levers = self.levers
        return describe_levers(levers["logprob_chunk_size"], levers["gradient_checkpointing"],
                               levers["activation_offload"], self.micro_batch, self.minibatch)

    def line(self) -> str:
        """The plan in one line, as the run prints it."""
        fixed = f"; set by hand: {', '.join(self.fixed)}" if self.fixed else ""
        return (f"memory plan (levers auto): {self.describe_levers()}; estimated peak {gib(self.estimate_bytes)} of "
                f"{gib(self.budget_bytes)} ({self.budget_source}, {HEADROOM:.0%} kept free){fixed}")

    def to_dict(self) -> dict:
        return {"levers": dict(self.levers), "chosen": list(self.chosen), "fixed": list(self.fixed),
                "estimate_bytes": self.estimate_bytes, "budget_bytes": self.budget_bytes,
                "budget_source": self.budget_source, "headroom": HEADROOM, "micro_batch": self.micro_batch,
                "line": self.line()}


def candidates(shape: ModelShape, settings: EstimateSettings, fixed=()):
    """(settings, levers turned on) in the order of their cost in time, starting with every free lever off. A lever
    is kept only where it lowers the estimate: one that cannot help (offload on a CPU, chunks shorter than nothing)
    costs time for nothing."""
    free = [lever for lever in AUTO_LEVERS if lever not in fixed]
    current = replace(settings, **{lever: OFF[lever] for lever in free})
    chosen: tuple = ()
    peak = estimate(shape, current).peak_bytes
    yield current, chosen, peak
    steps = []
    if "logprob_chunk_size" in free:
        steps += [("logprob_chunk_size", size) for size in CHUNK_SIZES]
    if "gradient_checkpointing" in free:
        steps.append(("gradient_checkpointing", True))
    if "activation_offload" in free and settings.device == "cuda":
        steps.append(("activation_offload", True))
    if "gradient_accumulation_steps" in free:
        steps += [("gradient_accumulation_steps", n) for n in accumulation_steps(current)]
    for lever, value in steps:
        candidate = replace(current, **{lever: value})
        candidate_peak = estimate(shape, candidate).peak_bytes
        if candidate_peak < peak:
            current, peak = candidate, candidate_peak
            chosen = chosen if lever in chosen else (*chosen, lever)
            yield current, chosen, peak


def accumulation_steps(settings: EstimateSettings) -> list[int]:
    """Every number of accumulation steps beyond ``settings``' own that splits its minibatch into whole micro-batches
    (``layout.check_batch`` says which), fewest first: each a smaller micro-batch."""
    rows = settings.minibatch_size or settings.train_rows
    valid = []
    for steps in range(settings.gradient_accumulation_steps + 1, rows + 1):
        try:
            replace(settings, gradient_accumulation_steps=steps)
        except ValueError:
            continue
        valid.append(steps)
    return valid


def plan_levers(shape: ModelShape, settings: EstimateSettings, budget_bytes: int, fixed=(),
                budget_source: str = "memory_budget") -> Plan:
    """The fastest plan whose estimate fits ``budget_bytes`` less ``HEADROOM``; ``fixed`` levers keep their values
    in ``settings``. Nothing fits: a ValueError naming what would."""
    last = None
    for candidate, chosen, peak in candidates(shape, settings, fixed):
        last = candidate, peak
        if peak <= usable(budget_bytes):
            levers = {lever: getattr(candidate, lever) for lever in AUTO_LEVERS}
            return Plan(levers, chosen, tuple(lever for lever in AUTO_LEVERS if lever in fixed), peak, budget_bytes,
                        budget_source, candidate.micro_batch, candidate.minibatch_size or candidate.train_rows)
    tightest, peak = last
    raise ValueError(_nothing_fits(shape, tightest, peak, budget_bytes, budget_source))


def _describe_settings(s: EstimateSettings) -> str:
    """:func:`describe_levers` of estimate settings (offload counts on CUDA only, as the estimate counts it)."""
    return describe_levers(s.logprob_chunk_size, s.gradient_checkpointing, s.activation_offload and s.device == "cuda",
                           s.micro_batch, s.minibatch_size or s.train_rows)


def _nothing_fits(shape: ModelShape, tightest: EstimateSettings, peak: int, budget: int, source: str) -> str:
    from .report import largest_batch

    need = peak / (1 - HEADROOM)
    batch = largest_batch(shape, tightest, usable(budget))
    advice = (f"batch_size {batch} would fit (it is {tightest.batch_size})" if batch else
              "no batch_size does: shorten max_new_tokens or max_prompt_length, quantize the base (quantization: "
              "4bit), or find more memory")
    return (f"levers auto: the run does not fit {gib(budget)} ({source}): with {_describe_settings(tightest)} the estimated "
            f"peak is {gib(peak)}, so it needs at least {gib(need)} ({HEADROOM:.0%} kept free); {advice}.")


def describe_levers(chunk_size, checkpointing: bool, offload: bool, micro_batch: int, minibatch: int) -> str:
    """The levers in words, as a plan's line and a refusal print them ("none" where none is on)."""
    parts = [f"log-prob chunks of {chunk_size}" if chunk_size else "",
             "gradient checkpointing" if checkpointing else "",
             "activation offload" if offload else "",
             f"micro-batch {micro_batch} of {minibatch} ({minibatch // micro_batch} accumulation steps)"
             if micro_batch < minibatch else ""]
    return ", ".join(filter(None, parts)) or "none"


# ------------------------------------------------------------------------------------------------ a run's plan


def plan_memory(model_config, config, accelerator, console=None):
    """``(model_config, config, plan)``: the run's configs with every unset lever decided (by the plan under levers
    auto, else off) and the plan (None: levers off, every lever set by hand, or a model whose shape the estimator
    cannot read, which it says in one warning). Every process plans for the smallest budget among them, so all
    split their minibatches alike."""
    fixed = tuple(lever for lever in AUTO_LEVERS if lever_value(model_config, config, lever) is not None)
    plan = None
    if config.levers == "auto" and len(fixed) < len(AUTO_LEVERS):
        shape = _model_shape(model_config)
        if shape is not None:
            budget, source = _budget(config, accelerator)
            settings = EstimateSettings.of(model_config, config, padded_prompts=True, gpus=accelerator.num_processes,
                                           device="cuda" if accelerator.device.type == "cuda" else "cpu")
            plan = plan_levers(shape, settings, budget, fixed, source)
            if console is not None and accelerator.is_main_process:
                console.print(plan.line())
    levers = plan.levers if plan else {lever: lever_value(model_config, config, lever) for lever in AUTO_LEVERS}
    levers = {lever: OFF[lever] if value is None else value for lever, value in levers.items()}
    return _with(model_config, levers), _with(config, levers), plan


def available_memory(device, processes: int = 1) -> tuple[int, str]:
    """(bytes, where the figure comes from): a GPU's free memory, or the machine's available RAM shared by the
    ``processes`` on it."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {torch.cuda.get_device_name(device)}"
    import psutil  # accelerate's dependency

    share = f" / {processes} processes" if processes > 1 else ""
    return psutil.virtual_memory().available // processes, f"available RAM{share}"


def _budget(config, accelerator) -> tuple[int, str]:
    if config.memory_budget:
        budget, source = parse_bytes(config.memory_budget), "memory_budget"
    else:
        budget, source = available_memory(accelerator.device, accelerator.num_processes)
    if accelerator.num_processes > 1:
        import torch

        smallest = torch.tensor([budget], dtype=torch.int64, device=accelerator.device)
        torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
        budget = int(smallest.item())
    return budget, source


def _model_shape(model_config) -> ModelShape | None:
    from ..model.loading import resolve_model
    from .shape import shape_from_hub

    where = resolve_model(model_config.model_name_or_path)
    try:
        return ModelShape.from_config(where) if "/" not in where or Path(where).exists() else shape_from_hub(where)
    except ValueError as error:
        logger.warning("levers auto: no estimate for this model (%s); the unset levers stay off.", error)
        return None


def lever_value(model_config, config, lever: str):
    """One of ``AUTO_LEVERS`` as a run's configs hold it (the accumulation steps in the RL config, the others in the
    model's); None: unset."""
    return getattr(config if hasattr(config, lever) else model_config, lever)


def _with(config, levers: dict):
    return replace(config, **{lever: value for lever, value in levers.items() if hasattr(config, lever)})
