"""``hydra-rlhf profile``: a few iterations per mode (and objective) at identical settings, memory measured per
stage. The run's shape is a ``config.RunShape``, in the recipes' words: ``batch_size`` counts prompts, each sampled
the objective's k times unless ``num_samples_per_prompt`` says otherwise, so to compare objectives at equal rows
set ``num_samples_per_prompt`` (e.g. batch 2 x 4 samples against PPO's batch 8 x 1 is batch 2 x 4 for both).

Fairness: every mode runs the same trainer code on the same prompts with the same seed, and generation ignores
EOS so every mode scores exactly ``max_new_tokens`` tokens. ``base_copies`` is counted from distinct parameter
storages and ``frozen_base_unchanged`` from a hash of every frozen base before and after the iterations.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import product

from ..config import HydraModelConfig, RLConfig, RunShape, from_fields, parse_bytes
from ..errors import check_at_least_one
from ..layout import MODES, check_mode, objective_info

# torch loads in the functions that run something: the CLI reads ProfileSettings' defaults without it


@dataclass
class ProfileSettings(RunShape):
    """A ``RunShape`` (``mode`` and ``objective``: the run :func:`profile_mode` makes) plus what the profiler
    needs: the model, which modes and objectives :func:`profile` runs, how many iterations, the prompts."""

    max_new_tokens: int = 32
    model: str = "smollm2-135m"
    modes: list[str] = field(default_factory=lambda: list(MODES))
    objectives: list[str] = field(default_factory=lambda: ["ppo"])
    iterations: int = 2
    prompts: str = "demo:train"
    seed: int = 0
    measure_memory: bool = True  # False: time the iterations without the CPU's live-tensor accounting (slower)
    memory_budget: str | None = None  # plan the levers not in fixed_levers for this budget, as levers auto does
    fixed_levers: tuple = ()

    def __post_init__(self):
        for mode in self.modes:
            check_mode(mode)
        for objective in self.objectives:
            objective_info(objective)
        check_at_least_one(self, "iterations")
        if self.memory_budget:
            parse_bytes(self.memory_budget)
        super().__post_init__()
        for mode, objective in product(self.modes, self.objectives):  # every run profile() makes, refused now
            RunShape.of(self, mode=mode, objective=objective)

    def runs(self) -> list[ProfileSettings]:
        """One settings per run of :func:`profile`: every mode for every objective."""
        return [replace(self, mode=mode, objective=objective)
                for mode, objective in product(self.modes, self.objectives)]


def profile_mode(settings: ProfileSettings, tokenizer, prompts, accelerator) -> dict:
    """Run ``settings.iterations`` iterations of ``settings.objective`` in ``settings.mode``; return its memory
    and invariants. Prompts are padded to ``max_prompt_length`` and EOS ignored: the shape is the one asked."""
    import torch

    from ..model.hydra import HydraModel
    from ..trainer import RLTrainer
    from .profiler import persistent_bytes, summarize

    model_config = from_fields(HydraModelConfig, settings, model_name_or_path=settings.model)
    with tempfile.TemporaryDirectory() as scratch:
        config = from_fields(
            RLConfig, settings, minibatch_size=settings.minibatch_size or settings.train_rows,
            prompts_path=settings.prompts, eval_prompts_path=None, pad_prompts_to_max_length=True, stop_at_eos=False,
            max_iterations=settings.iterations, num_epochs=1, save_every=0, save_final=False, output_dir=scratch,
            profile_memory=settings.measure_memory)
        model = HydraModel.from_config(model_config, device=accelerator.device, seed=settings.seed,
                                       critic=objective_info(settings.objective).critic)
        fingerprint = model.frozen_fingerprint()
        trainer = RLTrainer(model, tokenizer, config, prompts, accelerator)
        started = time.perf_counter()
        for _ in range(settings.iterations):
            trainer.step()
        seconds = time.perf_counter() - started
        trainer.profiler.close()
        stages = summarize(trainer.profiler.history)
        result = {
            "peak_bytes": max((s["peak_bytes"] for s in stages.values()), default=None),
            "persistent_bytes": persistent_bytes(model, trainer.optimizer),
            "base_copies": model.base_copies(),
            "frozen_base_unchanged": fingerprint == model.frozen_fingerprint(),
            "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
            "seconds_per_iteration": seconds / settings.iterations,
            "seconds_per_sample": seconds / (settings.iterations * settings.sequences),
            "stages": {name: {"peak_bytes": v["peak_bytes"], "delta_bytes": v["delta_bytes"]} for name, v in stages.items()},
        }
    del model, trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def matching_estimate(settings: ProfileSettings, tokenizer, prompts, device_type: str):
    """The ``hydra-rlhf estimate`` settings of the iteration :func:`profile_mode` runs: the same RunShape, the
    device, and an attention mask exactly when some prompt is shorter than ``max_prompt_length`` (the profiler
    left-pads every prompt to it). dtype auto resolves alike in both (bf16 on CUDA, fp32 on CPU)."""
    from ..data import encode_prompts
    from .shape import EstimateSettings

    shortest = min(len(ids) for ids in encode_prompts(tokenizer, prompts, 1 << 20)[0])
    return EstimateSettings.of(settings, device="cuda" if device_type == "cuda" else "cpu",
                               padded_prompts=shortest < settings.max_prompt_length)


def planned(settings: ProfileSettings, tokenizer, prompts, device_type: str):
    """What levers auto would choose for this run under ``settings.memory_budget`` (None without a budget)."""
    if not settings.memory_budget:
        return None
    from ..model.loading import resolve_model
    from .plan import plan_levers
    from .shape import ModelShape

    shape = ModelShape.from_config(resolve_model(settings.model))
    return plan_levers(shape, matching_estimate(settings, tokenizer, prompts, device_type),
                       parse_bytes(settings.memory_budget), settings.fixed_levers)


def compare(shape, settings: ProfileSettings, measured: dict, tokenizer, prompts, device_type: str) -> dict:
    """The estimate of the run :func:`profile_mode` measured (``measured``), stage by stage, printed and
    returned: estimated and measured bytes and the relative error per stage, the worst one, the peak's."""
    from .formulas import estimate
    from .profiler import format_bytes

    estimated = matching_estimate(settings, tokenizer, prompts, device_type)
    predicted = estimate(shape, estimated).stages
    print(f"\n{settings.mode}, {settings.objective}, batch {settings.batch_size} x {settings.samples_per_prompt}, "
          f"prompt {settings.max_prompt_length} + {settings.max_new_tokens} new tokens (padded prompts: "
          f"{estimated.padded_prompts}; levers: {settings.lever_values()})")
    stages = {}
    for stage, got in predicted.items():
        want = measured["stages"][stage]["peak_bytes"]
        stages[stage] = {"estimated_bytes": got, "measured_bytes": want, "relative_error": got / want - 1}
        print(f"  {stage:13s} estimate {format_bytes(got):>10s}  measured {format_bytes(want):>10s}  {got / want - 1:+6.1%}")
    peak_error = max(predicted.values()) / measured["peak_bytes"] - 1
    print(f"  {'peak':13s} {peak_error:+6.1%}")
    return {"settings": asdict(estimated), "stages": stages, "peak_relative_error": peak_error,
            "worst_relative_error": max(abs(s["relative_error"]) for s in stages.values())}


def profile(settings: ProfileSettings, progress=None) -> dict:
    """Profile every mode in ``settings.modes`` for every objective in ``settings.objectives``; the dict is what
    ``--json`` writes. Its "modes" are keyed by mode, or by ``mode/objective`` when several objectives run."""
    import torch

    from ..data import load_prompts
    from ..model.loading import load_tokenizer, resolve_model
    from ..run import make_accelerator
    from .profiler import CPU_MEASURE, CUDA_MEASURE

    accelerator = make_accelerator()
    resolve_model(settings.model)
    tokenizer = load_tokenizer(settings.model)
    prompts, _ = load_prompts(settings.prompts)
    modes = {}
    for run in settings.runs():
        label = run.mode if len(settings.objectives) == 1 else f"{run.mode}/{run.objective}"
        plan = planned(run, tokenizer, prompts, accelerator.device.type)
        run = replace(run, **plan.levers) if plan else run
        if progress:
            progress(label + (f" ({plan.line()})" if plan else ""))
        modes[label] = profile_mode(run, tokenizer, prompts, accelerator) | {"objective": run.objective}
        if plan:
            modes[label]["plan"] = plan.to_dict()
    on_cuda = accelerator.device.type == "cuda"
    return {
        "settings": asdict(settings),
        "device": torch.cuda.get_device_name(accelerator.device) if on_cuda else "cpu",
        "measure": CUDA_MEASURE if on_cuda else CPU_MEASURE,
        "modes": modes,
        "ratios": ratios(modes),
    }


def ratios(modes: dict) -> dict:
    """peak(mode) / peak(reference mode) for the mode pairs the paper compares; with several objectives, also
    each critic-free objective's peak against PPO's in the same mode ("hydra/grpo:ppo")."""
    pairs = [(m, "full") for m in ("lora", "j-hydra", "hydra")] + [(m, "lora") for m in ("j-hydra", "hydra")]
    found = {f"{mode}/{reference}": modes[mode]["peak_bytes"] / modes[reference]["peak_bytes"]
             for mode, reference in pairs if mode in modes and reference in modes}
    for label in modes:
        mode, _, objective = label.partition("/")
        if objective not in ("", "ppo") and f"{mode}/ppo" in modes:
            found[f"{label}:ppo"] = modes[label]["peak_bytes"] / modes[f"{mode}/ppo"]["peak_bytes"]
    return found
