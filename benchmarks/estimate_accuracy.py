"""How close ``hydra-rlhf estimate`` comes to ``hydra-rlhf profile``, stage by stage, on a real run.

    python benchmarks/estimate_accuracy.py                      # default grid, CPU fp32 (or CUDA bf16 when present)
    python benchmarks/estimate_accuracy.py --runs hydra:2:64:32,lora:4:32:32 --json estimate_accuracy.json
    python benchmarks/estimate_accuracy.py --runs hydra:8:64:32:ppo,hydra:2:64:32:grpo
    python benchmarks/estimate_accuracy.py --runs hydra:8:64:128,hydra:4:64:128 --gradient-checkpointing --all-levers

Each run is ``mode:batch:prompt_len:gen_len`` with an optional ``:objective`` (default ppo); batch counts prompts,
as ``batch_size`` does in the recipes, each sampled the objective's k times (grpo: hydra:2:64:32:grpo is 8 sequences).
The profiler left-pads (or cuts) every prompt to exactly ``prompt_len`` tokens and ignores EOS, so the estimate gets
the very shape that ran (``hydra_rlhf.memory.profile.compare``); ``padded_prompts`` is set from the data (true when
some prompt is shorter than ``prompt_len``, which gives transformers' attention mask).
Prints predicted / measured per stage and the worst relative error; the issue's target is 15%.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hydra_rlhf.data import load_prompts
from hydra_rlhf.memory.arguments import add_lever_arguments, settings_from_args
from hydra_rlhf.memory.profile import ProfileSettings, compare, profile_mode
from hydra_rlhf.memory.shape import ModelShape
from hydra_rlhf.model.loading import load_tokenizer, resolve_model
from hydra_rlhf.run import make_accelerator

DEFAULT_RUNS = "hydra:1:64:32,hydra:4:64:32,lora:2:64:32,j-hydra:4:32:32"


def parse_run(text: str) -> tuple[str, int, int, int, str]:
    try:
        mode, batch, prompt_len, gen_len, *objective = text.split(":")
        if len(objective) > 1:
            raise ValueError
        return mode, int(batch), int(prompt_len), int(gen_len), (objective or ["ppo"])[0]
    except ValueError:
        raise SystemExit(f"error: bad --runs entry {text!r}: use mode:batch:prompt_len:gen_len[:objective], e.g. "
                         "hydra:4:64:32 or hydra:2:64:32:grpo") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS,
                        help="Comma-separated mode:batch:prompt_len:gen_len[:objective] (batch: prompts).")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--model", default="smollm2-135m", help="Model to profile (default: the bundled one).")
    parser.add_argument("--prompts", default="demo:train", help="Prompts to profile with.")
    parser.add_argument("--json", type=Path)
    add_lever_arguments(parser)
    args = parser.parse_args()

    accelerator = make_accelerator()
    shape = ModelShape.from_config(Path(resolve_model(args.model)) / "config.json")
    tokenizer = load_tokenizer(args.model)
    prompts, _ = load_prompts(args.prompts)

    results, worst = [], 0.0
    for mode, batch, prompt_len, gen_len, objective in map(parse_run, args.runs.split(",")):
        run = settings_from_args(ProfileSettings, args, model=args.model, prompts=args.prompts, mode=mode,
                                 objective=objective, batch_size=batch, max_prompt_length=prompt_len,
                                 max_new_tokens=gen_len, gradient_checkpointing=bool(args.gradient_checkpointing))
        measured = profile_mode(run, tokenizer, prompts, accelerator)
        result = compare(shape, run, measured, tokenizer, prompts, accelerator.device.type)
        worst = max(worst, result["worst_relative_error"])
        results.append(result)
    device = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu"
    print(f"\nworst stage error {worst:.1%} on {device} (target: within 15%)")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "runs": results, "worst_relative_error": worst}, indent=2))


if __name__ == "__main__":
    main()
