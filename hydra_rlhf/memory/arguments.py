"""The flags that describe a run's shape, shared by ``hydra-rlhf profile`` and ``hydra-rlhf estimate``: each flag's
``dest`` is the ``config.RunShape`` field of the same name (the recipes' keys), so a command builds its settings
from the parsed flags by field name (``settings_from_args``). Each command's defaults are its settings class's.
Torch-free, like the estimator."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from ..config import ADAPTER_DTYPES, ALL_ON, AUTO_LEVERS, ALL_ON_CHUNK_SIZE, DTYPES, OPTIMIZERS, QUANTIZATIONS, RunShape
from ..layout import GENERATION_BACKENDS
from .shape import GPUS

PLANNED = " with --memory-budget or --gpu"

BATCH_HELP = ("Prompts per iteration, each sampled --num-samples-per-prompt times (as batch_size in the recipes). "
              "Objectives differ in their default k (ppo 1, rloo/grpo 4, online_dpo 2): to compare them at equal "
              "rows, pass --num-samples-per-prompt.")


def add_run_shape_arguments(parser: argparse.ArgumentParser, settings: type[RunShape]) -> None:
    """The run-shape flags, with ``settings``' defaults (the short spellings of earlier releases stay aliases)."""
    default = {f.name: f.default for f in fields(settings) if f.default is not MISSING}
    flag = parser.add_argument
    flag("--quantization", "--quant", dest="quantization", default=default["quantization"], choices=QUANTIZATIONS,
         help="Frozen base precision (bitsandbytes).")
    flag("--dtype", default=default["dtype"], choices=("auto", *DTYPES),
         help="Compute dtype of the base (auto: bf16 on a GPU, fp32 on a CPU).")
    flag("--lora-r", dest="lora_r", type=int, default=default["lora_r"], help="LoRA rank.")
    flag("--lora-layers", dest="lora_layers", type=int, default=None, metavar="N",
         help="LoRA on the top N decoder layers only (default: all): backward stops N layers down.")
    flag("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
         help=f"Recompute activations in backward (unset: off, or the plan's choice{PLANNED}).")
    flag("--batch-size", dest="batch_size", type=int, default=default["batch_size"], help=BATCH_HELP)
    flag("--num-samples-per-prompt", dest="num_samples_per_prompt", type=int, default=None, metavar="K",
         help="Responses per prompt (default: the objective's k).")
    flag("--minibatch-size", dest="minibatch_size", type=int, default=None,
         help="Sequences per optimizer step (default: every sequence of the iteration).")
    flag("--gradient-accumulation-steps", dest="gradient_accumulation_steps", type=int, default=None,
         help="Micro-batches per optimizer step: a training forward holds minibatch_size / "
         f"gradient_accumulation_steps rows (unset: 1, or the plan's choice{PLANNED}).")
    flag("--max-prompt-length", "--prompt-len", dest="max_prompt_length", type=int,
         default=default["max_prompt_length"], help="Prompt tokens: every prompt is cut or left-padded to this.")
    flag("--max-new-tokens", "--gen-len", dest="max_new_tokens", type=int, default=default["max_new_tokens"],
         help="Generated tokens (EOS ignored: every response is this long).")
    flag("--fusion", action=argparse.BooleanOptionalAction, default=default["fusion"],
         help="Sample-level fusion: generation and scoring as one stage (generate+score).")
    flag("--fusion-tail-fraction", dest="fusion_tail_fraction", type=float, default=default["fusion_tail_fraction"],
         help="fusion: finished responses are scored in chunks of this share of the batch.")
    flag("--generation-backend", dest="generation_backend", default=default["generation_backend"],
         choices=GENERATION_BACKENDS, help="Who samples: hf, or a vllm engine beside the learner (its own base copy "
         "and KV cache).")
    flag("--vllm-sleep-mode", action=argparse.BooleanOptionalAction, default=default["vllm_sleep_mode"],
         help="vllm: the engine's weights go to host memory and its KV cache is freed outside generate.")
    flag("--vllm-kv-cache-gib", dest="vllm_kv_cache_gib", type=float, default=None,
         help="vllm: the engine's KV cache (default: what one batch needs).")
    flag("--reward-model", "--reward-model-name-or-path", dest="reward_model_name_or_path", default=None,
         metavar="NAME", help="An external reward model beside the base (reward_model_name_or_path): one more "
         "frozen copy of the base's shape in memory, the cost of leaving the one-base layout.")
    flag("--reward-model-quantization", dest="reward_model_quantization",
         default=default["reward_model_quantization"], choices=QUANTIZATIONS, help="The external reward model's "
         "precision.")
    add_lever_arguments(parser)


def add_lever_arguments(parser: argparse.ArgumentParser) -> None:
    """The memory levers (``hydra_rlhf/memory/levers.py``), and ``--all-levers``."""
    parser.add_argument("--logprob-chunk-size", type=int, default=None, metavar="TOKENS",
                        help=f"Log-probs over chunks of this many tokens, no whole logits (0: off; e.g. {ALL_ON_CHUNK_SIZE}; "
                        f"unset: off, or the plan's choice{PLANNED}).")
    parser.add_argument("--optim", default="adamw_torch", choices=OPTIMIZERS, help="adamw_bnb_8bit: 8-bit AdamW states.")
    parser.add_argument("--activation-offload", action=argparse.BooleanOptionalAction, default=None,
                        help=f"CUDA: saved activations wait for backward in host memory (unset: off, or the plan's "
                        f"choice{PLANNED}).")
    parser.add_argument("--adapter-dtype", default="float32", choices=ADAPTER_DTYPES,
                        help="LoRA weights in fp32 or in the compute dtype (bf16 on a GPU).")
    parser.add_argument("--all-levers", action="store_true", help="Every lever on (chunks of "
                        f"{ALL_ON_CHUNK_SIZE} tokens, 8-bit AdamW, offload, adapters in the compute dtype).")


def add_budget_arguments(parser: argparse.ArgumentParser, gpu: bool = True) -> None:
    """Plan the levers left unset for a budget, as a run's ``levers: auto`` does (``memory/plan.py``)."""
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--memory-budget", dest="memory_budget", metavar="SIZE",
                        help="Plan the unset levers (log-prob chunks, gradient checkpointing, activation offload, "
                        "micro-batch) for this much memory, e.g. 16GB or 15.5GiB, as levers auto does in a run.")
    if gpu:
        budget.add_argument("--gpu", metavar="NAME", help="Plan for a card of the GPU table (its usable memory), "
                            f"e.g. T4 or 'RTX 4090': {', '.join(g.name for g in GPUS)}.")


def set_levers(args: argparse.Namespace) -> tuple[str, ...]:
    """The planned levers given on the command line (``--all-levers`` sets every one): a plan keeps them."""
    given = {lever for lever in AUTO_LEVERS if getattr(args, lever, None) is not None}
    if getattr(args, "all_levers", False):
        given |= set(ALL_ON.lever_values())
    return tuple(lever for lever in AUTO_LEVERS if lever in given)


def settings_from_args(settings: type[RunShape], args: argparse.Namespace, **values):
    """``settings`` from every parsed flag named after one of its fields and given (an unset lever keeps the
    settings' default: off), ``--all-levers`` turning every lever on; ``values`` win. The settings' own checks
    (``layout.check_*``) word any refusal."""
    found = {f.name: getattr(args, f.name) for f in fields(settings) if getattr(args, f.name, None) is not None}
    if getattr(args, "all_levers", False):
        found.update(ALL_ON.lever_values())
    return settings(**{**found, **values})
