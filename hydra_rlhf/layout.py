"""The one table of modes, roles, objectives and stages that the model, the trainer, the profiler and the
estimator all read. Plain data and small functions: no torch, so ``hydra-rlhf estimate`` stays light.

A *role plan* says, for every role, which base model serves it and which adapter is active there (``None`` =
adapters off, ``FULL`` = a plain, fully-trainable model). Critic-free objectives drop the ``critic`` role,
and with it the critic adapter, the value head, their optimizer state and the value forward.

    mode      bases                         policy        reference   reward      critic (PPO only)
    full      policy, reference, reward,    policy FULL   reference   reward      critic FULL
              critic (4 full copies)
    lora      sft, rm (2 copies)            sft/actor     sft/off     rm/off      rm/critic
    j-hydra   shared (1 copy)               shared/shared shared/off  shared/off  shared/shared
    hydra     shared (1 copy)               shared/actor  shared/off  shared/off  shared/critic
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import check_choice

MODES = ("full", "lora", "j-hydra", "hydra")
ROLES = ("policy", "reference", "reward", "critic")
FROZEN_ROLES = ("reference", "reward")
TRAINABLE_ROLES = ("policy", "critic")
FULL = "<full>"  # a role served by a whole trainable model, no adapter

# One PPO-style iteration, in order; each is a memory-profiler stage. ``advantages`` is where an objective turns
# the scored rollout into its targets (GAE, group baselines, or chosen/rejected pairs).
STAGES = ("generate", "score_frozen", "score_policy", "advantages", "train", "log")
# With sample-level fusion (``fusion: true``) the first three overlap: rows are scored while others still decode.
# They are profiled as one stage, this one, in their place.
FUSED_STAGE = "generate+score"
# Who samples the responses (``generation_backend``): transformers' generate on the HydraModel, or a vLLM engine on
# the same base serving the actor adapter (``hydra_rlhf/experience/vllm_engine.py``).
GENERATION_BACKENDS = ("hf", "vllm")
# How a multi-process run holds the base (``hydra_rlhf/model/sharding.py``): a whole replica per process, or 1/N of it.
SHARDINGS = ("none", "fsdp2")
# With asynchronous generation the learner's iteration is: receive (wait for the generator's batch), score_policy
# (the critic's values, PPO only), advantages, train, sync (the actor adapter to the generator), log.
STAGE_ORDER = ("generate", FUSED_STAGE, "receive", "score_frozen", "score_policy", "advantages", "train", "sync", "log")


def fusion_chunk_rows(tail_fraction: float, batch: int) -> int:
    """Finished responses fusion scores together (and the tail below which it scores each step's at once):
    ``ceil(tail_fraction x batch)``. The fused loop and the estimator both read it."""
    return max(1, math.ceil(tail_fraction * batch))

_PLANS: dict[str, dict[str, tuple[str, str | None]]] = {
    "full": {"policy": ("policy", FULL), "reference": ("reference", None), "reward": ("reward", None),
             "critic": ("critic", FULL)},
    "lora": {"policy": ("sft", "actor"), "reference": ("sft", None), "reward": ("rm", None), "critic": ("rm", "critic")},
    "j-hydra": {"policy": ("shared", "shared"), "reference": ("shared", None), "reward": ("shared", None),
                "critic": ("shared", "shared")},
    "hydra": {"policy": ("shared", "actor"), "reference": ("shared", None), "reward": ("shared", None),
              "critic": ("shared", "critic")},
}


@dataclass(frozen=True)
class ObjectiveInfo:
    """An objective as the layout, the config and the estimator know it; ``implementation`` names the class with
    its math and losses (``hydra_rlhf.objectives``). This table is the one registry of objectives."""

    name: str
    critic: bool  # builds a critic adapter and value head
    default_samples_per_prompt: int  # k when the config leaves it unset
    min_samples_per_prompt: int  # group baselines need 2 or more
    summary: str
    implementation: str  # "module:Class" under hydra_rlhf.objectives, imported when a run builds the objective
    pairs: bool = False  # learns from one chosen/rejected pair per prompt, kept together in every minibatch

    @property
    def rows_per_unit(self) -> int:
        """Rollout rows a minibatch keeps together: a pair for online DPO, else one response."""
        return 2 if self.pairs else 1

    def train_rows(self, prompts: int, samples_per_prompt: int) -> int:
        """Rows the learner trains on per iteration: every sample, or one pair per prompt."""
        return prompts * (2 if self.pairs else samples_per_prompt)


OBJECTIVES: dict[str, ObjectiveInfo] = {
    info.name: info for info in (
        ObjectiveInfo("ppo", True, 1, 1, "clipped policy and value losses, GAE on KL-shaped rewards (critic)",
                      "ppo:PPO"),
        ObjectiveInfo("rloo", False, 4, 2, "leave-one-out baseline over k samples, KL as a reward penalty",
                      "rloo:RLOO"),
        ObjectiveInfo("grpo", False, 4, 2, "group-normalised advantages, clipped ratio, KL as a loss term",
                      "grpo:GRPO"),
        ObjectiveInfo("online_dpo", False, 2, 2, "reward head picks chosen/rejected of 2 samples, DPO loss",
                      "online_dpo:OnlineDPO", pairs=True),
    )
}


def objective_info(name: str) -> ObjectiveInfo:
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}: use one of {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}: use one of {', '.join(MODES)}.")
    return mode


def role_plan(mode: str, critic: bool = True) -> dict[str, tuple[str, str | None]]:
    """The role plan of ``mode``; without ``critic``, the critic role (and whatever serves only it) is gone."""
    plan = dict(_PLANS[check_mode(mode)])
    if not critic:
        del plan["critic"]
    return plan


def base_names(plan: dict) -> list[str]:
    """The base models a plan loads, in first-use order."""
    return list(dict.fromkeys(base for base, _ in plan.values()))


def adapter_names(plan: dict) -> dict[str, list[str]]:
    """LoRA adapters per base (bases with none are absent)."""
    adapters: dict[str, list[str]] = {}
    for base, adapter in plan.values():
        if adapter not in (None, FULL) and adapter not in adapters.setdefault(base, []):
            adapters[base].append(adapter)
    return {base: names for base, names in adapters.items() if names}


def counts(plan: dict) -> dict[str, int]:
    """What a plan keeps in memory: base copies, LoRA adapters, fully-trainable copies, and the forwards with
    grad alive at backward time (one per distinct trainable (base, adapter) pair)."""
    trainable = {plan[role] for role in TRAINABLE_ROLES if role in plan}
    return {
        "base_copies": len(base_names(plan)),
        "adapters": sum(len(names) for names in adapter_names(plan).values()),
        "full_copies": sum(adapter == FULL for _, adapter in trainable),
        "train_graphs": len(trainable),
        "value_heads": int("critic" in plan),
    }


# ------------------------------------------------- what combines: each rule once, for the configs and the estimator


def check_quantized_full(mode: str, quantization: str) -> None:
    if mode == "full" and quantization != "none":
        raise ValueError(f"mode 'full' trains every weight of the policy and the critic, which a {quantization} "
                         "bitsandbytes base cannot (its weights are frozen); use quantization none, or mode lora, "
                         "j-hydra or hydra.")


def check_adapter_dtype(adapter_dtype: str, dtype: str) -> None:
    """``dtype`` as resolved (a config's ``auto`` is checked again once the device is known)."""
    if adapter_dtype == "compute" and dtype in ("float16", "fp16"):
        raise ValueError("adapter_dtype compute with a float16 base (a T4) would train fp16 weights without loss "
                         "scaling; keep adapter_dtype float32 there.")


def check_engine(generation_backend: str, fusion: bool, mode: str | None = None) -> None:
    check_choice("generation_backend", generation_backend, GENERATION_BACKENDS)
    if generation_backend != "vllm":
        return
    if fusion:
        raise ValueError("fusion and generation_backend vllm: vLLM schedules its own batches (finished requests "
                         "leave at once, new ones join), so our fused decode loop has nothing to add there. "
                         "Set one of them.")
    if mode == "full":
        raise ValueError("generation_backend vllm serves the actor adapter, and mode full has none: use mode lora, "
                         "j-hydra or hydra.")


def check_sharding(sharding: str, generation_backend: str = "hf", fusion: bool = False,
                   async_generation: bool = False, quantization: str = "none") -> None:
    """What a sharded base (``sharding fsdp2``: each rank holds 1/N of it) can run with; docs/sharding.md says why."""
    check_choice("sharding", sharding, SHARDINGS)
    if sharding == "none":
        return
    if quantization == "8bit":
        raise ValueError("sharding fsdp2 with an 8bit bitsandbytes base: its int8 weights cannot be FSDP shards "
                         "(FSDP shards floating-point parameters); use quantization 4bit (sharded like the rest) "
                         "or none.")
    if fusion:
        raise ValueError("sharding fsdp2 and fusion: the fused decode loop drives the decoder step by step outside "
                         "FSDP's gather of the root's weights; use generate (fusion false) with a sharded base.")
    if generation_backend == "vllm":
        raise ValueError("sharding fsdp2 and generation_backend vllm: a vLLM engine needs the whole base on one "
                         "device, which sharding exists to avoid; use generation_backend hf with a sharded base.")
    if async_generation:
        raise ValueError("sharding fsdp2 and async_generation: the generator would need its own whole base (rank 1, "
                         "or a child process sharing it), which sharding exists to avoid; use one of them.")


def check_batch(objective: str, batch_size: int, samples_per_prompt: int, minibatch_size: int,
                gradient_accumulation_steps: int) -> None:
    """k samples per prompt where the objective compares them; minibatches that tile the iteration's rows;
    micro-batches that tile a minibatch (and keep online DPO's pairs whole)."""
    info = objective_info(objective)
    if samples_per_prompt < info.min_samples_per_prompt:
        raise ValueError(f"objective {objective} compares samples of the same prompt: num_samples_per_prompt "
                         f"must be at least {info.min_samples_per_prompt}, got {samples_per_prompt}.")
    rows = info.train_rows(batch_size, samples_per_prompt)
    micro = minibatch_size // gradient_accumulation_steps
    if rows % minibatch_size or micro * gradient_accumulation_steps != minibatch_size:
        raise ValueError(
            f"the {rows} sequences an iteration trains on (batch_size {batch_size} x {rows // batch_size} per "
            f"prompt) must be a multiple of minibatch_size ({minibatch_size}), which must be a multiple of "
            f"gradient_accumulation_steps ({gradient_accumulation_steps}).")
    if micro % info.rows_per_unit:
        raise ValueError(f"objective {objective} keeps each chosen/rejected pair together: minibatch_size / "
                         f"gradient_accumulation_steps ({micro}) must be even.")


def check_critic_warmup(objective: str, critic_warmup: int, max_iterations: int) -> None:
    """Iterations that train the critic alone need a critic, and must leave the actor at least one."""
    if critic_warmup and not objective_info(objective).critic:
        raise ValueError(f"critic_warmup needs a critic: objective {objective} has none (use ppo, or set "
                         "critic_warmup 0).")
    if critic_warmup >= max_iterations:
        raise ValueError(f"critic_warmup {critic_warmup} leaves the actor no iteration of max_iterations "
                         f"{max_iterations}: raise max_iterations or lower critic_warmup.")
