"""Each memory lever off and on, measured side by side in one run, and the estimate checked against the levers-on runs.

    python benchmarks/memory_levers.py --json runs/levers/levers.json

Hydra-PPO on the bundled model, batch 8, 64 prompt + 128 generated tokens, gradient checkpointing on (the
issue's setting; flags change it). For every configuration - no lever, each lever alone, all levers - the
profiler measures memory per stage, then the same iterations run again without the memory accounting (which
slows a CPU run several-fold) to time them. The figure that matters is the train stage's peak above the
persistent bytes (weights, adapters, heads, optimizer state): what the levers cut. Levers that cannot act on
this device are reported as skipped, with the reason, not run: activation offload needs CUDA, and adapters in
the compute dtype are fp32 anyway on a CPU. Then ``hydra-rlhf estimate`` is compared stage by stage with the
levers-on profile at two batch sizes (target: within 15%).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from hydra_rlhf.config import ALL_ON
from hydra_rlhf.data import load_prompts
from hydra_rlhf.memory.profile import ProfileSettings, compare, profile_mode
from hydra_rlhf.memory.profiler import format_bytes
from hydra_rlhf.memory.shape import ModelShape
from hydra_rlhf.model.loading import load_tokenizer, resolve_model
from hydra_rlhf.run import make_accelerator


def lever_settings(chunk_size: int) -> dict[str, dict]:
    """Configuration name -> the one key it turns on (as ``--all-levers`` sets it)."""
    return {"logprob_chunk_size": {"logprob_chunk_size": chunk_size}, "optim": {"optim": ALL_ON.optim},
            "activation_offload": {"activation_offload": True}, "adapter_dtype": {"adapter_dtype": ALL_ON.adapter_dtype}}
TARGET_CUT = 0.40  # all levers: at least 40% less train-stage memory above the persistent bytes


def skip_reason(lever: str, device_type: str) -> str | None:
    if device_type == "cuda":
        return None
    if lever == "activation_offload":
        return "CUDA only: on a CPU the host memory is the device memory"
    if lever == "adapter_dtype":
        return "the compute dtype is fp32 on a CPU, so adapters are fp32 either way"
    return None


def measure(name: str, settings: ProfileSettings, tokenizer, prompts, accelerator) -> dict:
    print(f"{name}: profiling memory ...", flush=True)
    memory = profile_mode(settings, tokenizer, prompts, accelerator)
    print(f"{name}: timing without the accounting ...", flush=True)
    timing = profile_mode(replace(settings, measure_memory=False), tokenizer, prompts, accelerator)
    train = memory["stages"]["train"]["peak_bytes"]
    return {
        "levers": settings.lever_values(),
        "train_peak_bytes": train,
        "persistent_bytes": memory["persistent_bytes"],
        "train_above_persistent_bytes": train - memory["persistent_bytes"],
        "peak_bytes": memory["peak_bytes"],
        "stages": memory["stages"],
        "seconds_per_iteration": timing["seconds_per_iteration"],
        "seconds_per_iteration_profiled": memory["seconds_per_iteration"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=2, help="Per configuration; the second has AdamW states.")
    parser.add_argument("--estimate-batches", default="8,4", help="Batch sizes of the estimate-vs-profile check.")
    parser.add_argument("--chunk-size", type=int, default=ALL_ON.logprob_chunk_size, help="logprob_chunk_size.")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--reuse", action="store_true", help="Take the measured runs from --json (same settings) and "
                        "redo only the comparison with the estimate, e.g. after changing the estimator.")
    args = parser.parse_args()

    accelerator = make_accelerator()
    device_type = accelerator.device.type
    tokenizer = load_tokenizer(args.model)
    prompts, _ = load_prompts("demo:train")
    shape = ModelShape.from_config(Path(resolve_model(args.model)) / "config.json")
    base = ProfileSettings(model=args.model, mode="hydra", modes=["hydra"], batch_size=args.batch_size,
                           max_prompt_length=args.prompt_len, max_new_tokens=args.gen_len, iterations=args.iterations,
                           gradient_checkpointing=True)

    levers = lever_settings(args.chunk_size)
    all_on = replace(base, **{**ALL_ON.lever_values(), "logprob_chunk_size": args.chunk_size})
    batches = [int(b) for b in args.estimate_batches.split(",")]
    if args.reuse:
        previous = json.loads(args.json.read_text())
        runs, skipped, checks = previous["runs"], previous["skipped"], previous["estimate_checks"]
    else:
        runs, skipped = {"none": measure("none", base, tokenizer, prompts, accelerator)}, {}
        for lever, keys in levers.items():
            reason = skip_reason(lever, device_type)
            if reason:
                skipped[lever] = reason
                print(f"{lever}: skipped ({reason})")
                continue
            runs[lever] = measure(lever, replace(base, **keys), tokenizer, prompts, accelerator)
        runs["all"] = measure("all", all_on, tokenizer, prompts, accelerator)
        checks = {str(batch): profile_mode(replace(all_on, batch_size=batch), tokenizer, prompts, accelerator)
                  for batch in batches if batch != args.batch_size}
        checks[str(args.batch_size)] = {"stages": runs["all"]["stages"], "peak_bytes": runs["all"]["peak_bytes"]}

    none = runs["none"]
    print(f"\nhydra, batch {args.batch_size}, prompt {args.prompt_len} + gen {args.gen_len}, gradient checkpointing, "
          f"{device_type}; train-stage peak above the persistent bytes, and seconds per iteration")
    for name, run in runs.items():
        run["cut"] = 1 - run["train_above_persistent_bytes"] / none["train_above_persistent_bytes"]
        print(f"  {name:20s} train {format_bytes(run['train_peak_bytes']):>10s}  persistent "
              f"{format_bytes(run['persistent_bytes']):>10s}  above {format_bytes(run['train_above_persistent_bytes']):>10s}"
              f"  ({-run['cut']:+.0%})  {run['seconds_per_iteration']:6.1f} s/iter "
              f"({run['seconds_per_iteration'] / none['seconds_per_iteration']:.2f}x)")
    cut = runs["all"]["cut"]
    print(f"all levers: {cut:.0%} less above the persistent bytes (target: at least {TARGET_CUT:.0%}: "
          f"{'met' if cut >= TARGET_CUT else 'MISSED'})")

    accuracy = [compare(shape, replace(all_on, batch_size=batch), checks[str(batch)], tokenizer, prompts, device_type)
                for batch in batches]
    worst = max(run["worst_relative_error"] for run in accuracy)
    print(f"\nestimate vs profile with every lever on: worst stage {worst:.1%} (target: within 15%)")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": device_type, "settings": {"mode": "hydra", "batch_size": args.batch_size,
                                                "max_prompt_length": args.prompt_len, "max_new_tokens": args.gen_len,
                                                "gradient_checkpointing": True, "iterations": args.iterations},
            "runs": runs, "skipped": skipped, "all_levers_cut": cut, "target_cut": TARGET_CUT,
            "estimate_checks": checks, "estimate_accuracy": accuracy, "worst_estimate_error": worst,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
