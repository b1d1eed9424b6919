"""``hydra-rlhf profile``: a few iterations per mode (and objective) at identical settings, memory measured per
stage. ``batch_size`` counts generated sequences, so PPO (1 sample per prompt) and a critic-free objective (k
samples of batch_size / k prompts) train on the same number of rows: the difference is the critic.

Fairness: every mode runs the same trainer code on the same prompts with the same seed, and generation ignores
EOS so every mode scores exactly ``gen_len`` tokens. ``base_copies`` is counted from distinct parameter storages
and ``frozen_base_unchanged`` from a hash of every frozen base before and after the iterations.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from ..config import HydraModelConfig

from ..model.hydra import HydraModel
from ..errors import check_at_least_one
from ..layout import MODES, objective_info
from .levers import Levers
from .profiler import persistent_bytes, summarize


@dataclass
class ProfileSettings(Levers):
    model: str = "smollm2-135m"
    modes: list[str] = field(default_factory=lambda: list(MODES))
    objectives: list[str] = field(default_factory=lambda: ["ppo"])
    batch_size: int = 8  # sequences per iteration: prompts x the objective's samples per prompt
    prompt_len: int = 64  # every prompt is cut from the left or left-padded to exactly this many tokens
    gen_len: int = 32
    iterations: int = 2
    quantization: str = "none"
    gradient_checkpointing: bool = False
    lora_r: int = 16
    prompts: str = "demo:train"
    seed: int = 0
    fusion: bool = False  # generation and scoring fused (fusion.py): one stage, generate+score
    measure_memory: bool = True  # False: time the iterations without the CPU's live-tensor accounting (slower)

    def __post_init__(self):
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"Unknown mode {unknown[0]!r}: use a comma-separated subset of {','.join(MODES)}.")
        check_at_least_one(self, "batch_size", "prompt_len", "gen_len", "iterations", "lora_r")
        self.check_levers()
        for objective in self.objectives:
            k = objective_info(objective).default_samples_per_prompt
            if self.batch_size % k:
                raise ValueError(f"batch_size {self.batch_size} must be a multiple of {k}, the samples per prompt of "
                                 f"objective {objective}.")
        if "full" in self.modes and self.quantization != "none":
            raise ValueError("mode 'full' trains every weight and cannot use a quantized base; drop it from --modes.")


def profile_mode(mode: str, settings: ProfileSettings, tokenizer, prompts, accelerator, objective: str = "ppo") -> dict:
    """Run ``settings.iterations`` iterations of ``objective`` in ``mode``; return its memory and invariants."""
    from ..config import RLConfig
    from ..trainer import RLTrainer

    model_config = HydraModelConfig(model_name_or_path=settings.model, mode=mode, quantization=settings.quantization,
                                    gradient_checkpointing=settings.gradient_checkpointing, lora_r=settings.lora_r,
                                    logprob_chunk_size=settings.logprob_chunk_size,
                                    activation_offload=settings.activation_offload, adapter_dtype=settings.adapter_dtype)
    with tempfile.TemporaryDirectory() as scratch:
        info = objective_info(objective)
        k = info.default_samples_per_prompt
        ppo_config = RLConfig(
            objective=objective, num_samples_per_prompt=k, prompts_path=settings.prompts, eval_prompts_path=None,
            batch_size=settings.batch_size // k, minibatch_size=info.train_rows(settings.batch_size // k, k), max_prompt_length=settings.prompt_len,
            pad_prompts_to_max_length=True, max_new_tokens=settings.gen_len,
            stop_at_eos=False, max_iterations=settings.iterations, num_epochs=1, save_every=0, save_final=False,
            output_dir=scratch, seed=settings.seed, optim=settings.optim, profile_memory=settings.measure_memory,
            fusion=settings.fusion,
        )
        model = HydraModel.from_config(model_config, device=accelerator.device, seed=settings.seed, critic=info.critic)
        fingerprint = model.frozen_fingerprint()
        trainer = RLTrainer(model, tokenizer, ppo_config, prompts, accelerator)
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
            "seconds_per_sample": seconds / (settings.iterations * settings.batch_size),
            "stages": {name: {"peak_bytes": v["peak_bytes"], "delta_bytes": v["delta_bytes"]} for name, v in stages.items()},
        }
    del model, trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def matching_estimate(mode: str, settings: ProfileSettings, tokenizer, prompts, device_type: str, objective: str = "ppo"):
    """The ``hydra-rlhf estimate`` settings for the iteration :func:`profile_mode` runs, to compare the two: the
    same shape and precision (bf16 on CUDA, fp32 on CPU), and an attention mask exactly when some prompt is
    shorter than ``prompt_len`` (the profiler left-pads every prompt to it)."""
    from ..data import encode_prompts
    from .estimate import EstimateSettings

    shortest = min(len(ids) for ids in encode_prompts(tokenizer, prompts, 1 << 20)[0])
    on_cuda = device_type == "cuda"
    return EstimateSettings(
        mode=mode, objective=objective, quant=settings.quantization, batch_size=settings.batch_size, prompt_len=settings.prompt_len,
        gen_len=settings.gen_len, lora_r=settings.lora_r, gradient_checkpointing=settings.gradient_checkpointing,
        dtype="bf16" if on_cuda else "fp32", device="cuda" if on_cuda else "cpu",
        padded_prompts=shortest < settings.prompt_len, fusion=settings.fusion, **settings.levers(),
    )


def profile(settings: ProfileSettings, progress=None) -> dict:
    """Profile every mode in ``settings.modes`` for every objective in ``settings.objectives``; the dict is what
    ``--json`` writes. Its "modes" are keyed by mode, or by ``mode/objective`` when several objectives run."""
    from ..data import load_prompts
    from ..model.loading import load_tokenizer, resolve_model
    from ..run import make_accelerator

    accelerator = make_accelerator()
    resolve_model(settings.model)
    tokenizer = load_tokenizer(settings.model)
    prompts, _ = load_prompts(settings.prompts)
    modes = {}
    for mode in settings.modes:
        for objective in settings.objectives:
            label = mode if len(settings.objectives) == 1 else f"{mode}/{objective}"
            if progress:
                progress(label)
            modes[label] = profile_mode(mode, settings, tokenizer, prompts, accelerator, objective)
            modes[label]["objective"] = objective
    measure_device = accelerator.device
    from .profiler import CPU_MEASURE, CUDA_MEASURE

    return {
        "settings": asdict(settings),
        "device": torch.cuda.get_device_name(measure_device) if measure_device.type == "cuda" else "cpu",
        "measure": CUDA_MEASURE if measure_device.type == "cuda" else CPU_MEASURE,
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
