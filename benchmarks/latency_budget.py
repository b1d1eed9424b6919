"""Latency per sample under a fixed memory budget, the Hydra-RLHF paper's method, measured on this machine.

    python benchmarks/latency_budget.py --budget-gib 1.5 --modes lora,hydra

For each mode: the largest batch whose estimated peak (hydra_rlhf.memory.formulas, the same stage model the
`estimate` command uses) fits the budget, capped by --max-batch; then real PPO iterations at that batch on the
bundled model: the measured peak (checked against the budget) and the seconds per sample. The paper's claim
(-65% latency per sample for Hydra-PPO against LoRA-PPO) comes from the larger batch the freed memory buys on a
GPU; on a CPU, time per sample barely falls with the batch, so expect a ratio near 1 here. The output says
which device the figures are from.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from hydra_rlhf.data import load_prompts
from hydra_rlhf.memory.formulas import estimate
from hydra_rlhf.memory.profile import ProfileSettings, matching_estimate, profile_mode
from hydra_rlhf.memory.profiler import format_bytes
from hydra_rlhf.memory.report import largest_batch
from hydra_rlhf.memory.shape import ModelShape
from hydra_rlhf.model.loading import load_tokenizer, resolve_model
from hydra_rlhf.run import make_accelerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-gib", type=float, default=1.5)
    parser.add_argument("--modes", default="lora,hydra")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32, help="Cap (CPU time grows with the batch).")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    budget = int(args.budget_gib * 2**30)
    path = resolve_model("smollm2-135m")
    shape = ModelShape.from_config(Path(path) / "config.json")
    accelerator = make_accelerator()
    device = "cuda" if accelerator.device.type == "cuda" else "cpu"
    tokenizer = load_tokenizer("smollm2-135m")
    prompts, _ = load_prompts("demo:train")
    rows = {}
    for mode in args.modes.split(","):
        run = ProfileSettings(mode=mode, batch_size=1, max_prompt_length=args.prompt_len, max_new_tokens=args.gen_len,
                              iterations=args.iterations)
        settings = matching_estimate(run, tokenizer, prompts, device)
        batch = min(largest_batch(shape, settings, budget), args.max_batch)
        if batch == 0:
            print(f"{mode}: does not fit {args.budget_gib} GiB even at batch 1")
            continue
        predicted = estimate(shape, dataclasses.replace(settings, batch_size=batch)).peak_bytes
        measured = profile_mode(dataclasses.replace(run, batch_size=batch), tokenizer, prompts, accelerator)
        rows[mode] = {"batch_size": batch, "estimated_peak_bytes": predicted, "measured_peak_bytes": measured["peak_bytes"],
                      "within_budget": measured["peak_bytes"] <= budget,
                      "seconds_per_sample": measured["seconds_per_sample"]}
        print(f"{mode:8s} batch {batch:3d}  peak est {format_bytes(predicted)} / measured "
              f"{format_bytes(measured['peak_bytes'])}  {measured['seconds_per_sample']:.3f} s/sample")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if "hydra" in rows and "lora" in rows:
        ratio = rows["hydra"]["seconds_per_sample"] / rows["lora"]["seconds_per_sample"]
        print(f"latency per sample hydra / lora = {ratio:.3f} on {device_name} (paper, Llama-7B on A100: Hydra-PPO "
              "6.47 s / LoRA-PPO 18.75 s = 0.345, from Hydra's larger batch)")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "budget_bytes": budget, "modes": rows}, indent=2))


if __name__ == "__main__":
    main()
