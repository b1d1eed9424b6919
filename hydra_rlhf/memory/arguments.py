"""The flags that describe a run's shape, shared by ``hydra-rlhf profile`` and ``hydra-rlhf estimate``: each flag's
``dest`` is the ``config.RunShape`` field of the same name (the recipes' keys), so a command builds its settings
from the parsed flags by field name (``settings_from_args``). Each command's defaults are its settings class's.
Torch-free, like the estimator."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from ..config import ADAPTER_DTYPES, ALL_ON, ALL_ON_CHUNK_SIZE, DTYPES, OPTIMIZERS, QUANTIZATIONS, Levers, RunShape
from ..layout import GENERATION_BACKENDS

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
    flag("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=default["gradient_checkpointing"],
         help="Recompute activations in backward.")
    flag("--batch-size", dest="batch_size", type=int, default=default["batch_size"], help=BATCH_HELP)
    flag("--num-samples-per-prompt", dest="num_samples_per_prompt", type=int, default=None, metavar="K",
         help="Responses per prompt (default: the objective's k).")
    flag("--minibatch-size", dest="minibatch_size", type=int, default=None,
         help="Sequences per optimizer step (default: every sequence of the iteration).")
    flag("--gradient-accumulation-steps", dest="gradient_accumulation_steps", type=int,
         default=default["gradient_accumulation_steps"], help="Micro-batches per optimizer step: a training forward "
         "holds minibatch_size / gradient_accumulation_steps rows.")
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
    parser.add_argument("--logprob-chunk-size", type=int, default=0, metavar="TOKENS",
                        help=f"Log-probs over chunks of this many tokens, no whole logits (0: off; e.g. {ALL_ON_CHUNK_SIZE}).")
    parser.add_argument("--optim", default="adamw_torch", choices=OPTIMIZERS, help="adamw_bnb_8bit: 8-bit AdamW states.")
    parser.add_argument("--activation-offload", action=argparse.BooleanOptionalAction, default=False,
                        help="CUDA: saved activations wait for backward in host memory.")
    parser.add_argument("--adapter-dtype", default="float32", choices=ADAPTER_DTYPES,
                        help="LoRA weights in fp32 or in the compute dtype (bf16 on a GPU).")
    parser.add_argument("--all-levers", action="store_true", help="Every lever on (chunks of "
                        f"{ALL_ON_CHUNK_SIZE} tokens, 8-bit AdamW, offload, adapters in the compute dtype).")


def levers_from_args(args: argparse.Namespace) -> dict:
    if args.all_levers:
        return ALL_ON.levers()
    return {f.name: getattr(args, f.name) for f in fields(Levers)}


def settings_from_args(settings: type[RunShape], args: argparse.Namespace, **values):
    """``settings`` from every parsed flag named after one of its fields (``--all-levers`` turning every lever
    on); ``values`` win. The settings' own checks (``layout.check_*``) word any refusal."""
    found = {f.name: getattr(args, f.name) for f in fields(settings) if hasattr(args, f.name)}
    if hasattr(args, "all_levers"):
        found.update(levers_from_args(args))
    return settings(**{**found, **values})
