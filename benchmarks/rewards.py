"""Verifiable rewards on this machine: the arithmetic task, objective by objective and seed by seed, and what the
reward sources cost in memory and time.

    python benchmarks/rewards.py --json runs/rewards/rewards.json
    python benchmarks/rewards.py --objectives ppo,grpo --seeds 0,1,2 --json runs/rewards/rewards.json
    python benchmarks/rewards.py --objectives rloo,online_dpo --seeds 0 --skip_memory --json runs/rewards/more.json

**Accuracy.** Each (objective, seed) runs the verifiable task's recipe as a user runs it (``recipes/ppo.py --config
recipes/configs/<objective>_arithmetic.yaml --seed S``, what ``recipes/demo.py --task arithmetic`` runs: the
bundled model as the base, the built-in ``accuracy`` reward, no Hydra-SFT step), at the equal budget of generated
responses those configs share, and reads its held-out accuracy before and after (greedy). Reported per seed (accuracy before and after, KL,
response length, wall time, the reward functions' seconds per iteration) and per objective (mean +- std, worst
seed). ``min_accuracy_gain`` is the worst seed over PPO and GRPO, as a fraction.

**Memory.** Three short runs of the PPO config at identical settings, peak per stage from the profiler: the reward
function alone (head weight 0), the Hydra head alone (the same base: one base in memory either way), and an
external reward model (a sequence-classification copy of the bundled model, made here: one more base), the last
against ``hydra-rlhf estimate``'s figure for that extra copy.

``--set key=value`` passes a flag to every run (the tests shrink everything to a tiny model with it).
"""

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from hydra_rlhf.experiments import ROOT, as_flags, run_rl_recipe, run_script, write_json
from hydra_rlhf.memory.profiler import format_bytes, wide_console

PAIR = ("ppo", "grpo")  # the objectives the gain target is read on: a critic, and the group baseline


def run_task(output: Path, objective: str, seed: int, flags: list[str], reuse: bool) -> dict:
    """One run of the task's recipe: its held-out accuracy before and after, and how it got there."""
    summary, seconds = run_rl_recipe(output, f"recipes/configs/{objective}_arithmetic.yaml",
                                     ["--seed", str(seed), *flags], reuse)
    evaluation, last = summary["eval"], summary["final_metrics"]
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {"seed": seed, "accuracy_before": evaluation["accuracy_before"],
            "accuracy_after": evaluation["accuracy_after"],
            "accuracy_gain": evaluation["accuracy_after"] - evaluation["accuracy_before"],
            "kl": last["objective/kl"], "response_length": last["response/length_mean"],
            "iterations": summary["iterations"], "wall_seconds": seconds,
            "reward_seconds_per_iteration": statistics.fmean(m.get("speed/reward_seconds", 0.0) for m in metrics)}


def spread(rows: list[dict]) -> dict:
    result = {}
    for key in ("accuracy_before", "accuracy_after", "accuracy_gain", "kl", "wall_seconds"):
        values = [row[key] for row in rows]
        result[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                       "min": min(values), "max": max(values)}
    return result


def memory_runs(args, flags: list[str]) -> dict:
    """Peak per stage: reward function, Hydra head, external reward model; the estimate of the extra copy."""
    rm_dir = args.output_dir / "reward_model"
    if not (rm_dir / "config.json").is_file():
        make_reward_model(args.base, rm_dir)
    common = ["--config", "recipes/configs/ppo_arithmetic.yaml", "--max_iterations", str(args.memory_iterations),
              "--eval_prompts_path", "", "--save_every", "0", "--save_final", "false", "--stop_at_eos", "false",
              *flags]
    variants = {"reward_function": [],
                "reward_head": ["--reward_head_weight", "1", "--reward_funcs", "accuracy", "--reward_weights", "0"],
                "reward_model": ["--reward_model_name_or_path", str(rm_dir)]}
    results = {}
    for name, extra in variants.items():
        output = args.output_dir / f"memory_{name}"
        if not (args.reuse and (output / "summary.json").is_file()):
            shutil.rmtree(output, ignore_errors=True)
            run_script(["recipes/ppo.py", *common, *extra, "--output_dir", str(output)])
        summary = json.loads((output / "summary.json").read_text())
        results[name] = {"peak_bytes": summary["peak_bytes"], "train_peak_bytes": summary["memory"]["train"]["peak_bytes"],
                         "base_copies": summary["base_copies"]}
    measured = results["reward_model"]["train_peak_bytes"] - results["reward_function"]["train_peak_bytes"]
    estimated = estimated_reward_model_bytes(args)
    results["reward_model_extra"] = {"measured_bytes": measured, "estimated_bytes": estimated,
                                     "estimate_error": estimated / measured - 1 if measured else None}
    results["head_vs_function_train_peak"] = (results["reward_head"]["train_peak_bytes"]
                                              / results["reward_function"]["train_peak_bytes"])
    return results


def make_reward_model(base: str, directory: Path) -> None:
    """A stand-in external reward model: the base as a one-label sequence classifier (its score head untrained:
    this measures memory, not reward quality), with its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hydra_rlhf.model.loading import resolve_model

    path = resolve_model(base)
    AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).save_pretrained(directory)
    AutoTokenizer.from_pretrained(path).save_pretrained(directory)


def estimated_reward_model_bytes(args) -> int:
    """``hydra-rlhf estimate``'s extra bytes for an external reward model of the base's shape, fp32 on CPU."""
    from hydra_rlhf.memory.formulas import reward_model_bytes
    from hydra_rlhf.memory.shape import EstimateSettings, ModelShape
    from hydra_rlhf.model.loading import resolve_model

    shape = ModelShape.from_config(Path(resolve_model(args.base)) / "config.json")
    return reward_model_bytes(shape, EstimateSettings(device="cpu", reward_model_name_or_path="rm"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objectives", default="ppo,grpo", help="Comma-separated objectives to sweep.")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds.")
    parser.add_argument("--base", default="smollm2-135m", help="The base model of every run.")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/rewards"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="A flag for every run.")
    parser.add_argument("--memory_iterations", type=int, default=2, help="Iterations of each memory run.")
    parser.add_argument("--skip_memory", action="store_true", help="Only the accuracy sweep.")
    parser.add_argument("--reuse", action="store_true", help="Read finished runs in output_dir instead of rerunning.")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    args = parser.parse_args(argv)
    args.output_dir = (ROOT / args.output_dir) if not args.output_dir.is_absolute() else args.output_dir
    flags = as_flags(args.set)
    console = wide_console()
    runs = {}
    for objective in args.objectives.split(","):
        runs[objective] = [run_task(args.output_dir / f"{objective}-seed{seed}", objective, int(seed),
                                    ["--model_name_or_path", args.base, *flags], args.reuse)
                           for seed in args.seeds.split(",")]
        for row in runs[objective]:
            console.print(f"{objective} seed {row['seed']}: accuracy {row['accuracy_before']:.1%} -> "
                          f"{row['accuracy_after']:.1%} ({row['accuracy_gain']:+.1%}), KL {row['kl']:.2f}, "
                          f"{row['iterations']} iterations, {row['wall_seconds'] / 60:.1f} min")
    gains = [row["accuracy_gain"] for objective in PAIR if objective in runs for row in runs[objective]]
    results = {"runs": runs, "summary": {objective: spread(rows) for objective, rows in runs.items()},
               "min_accuracy_gain": min(gains) if gains else None}
    if not args.skip_memory:
        results["memory"] = memory_runs(args, ["--model_name_or_path", args.base, *flags])
        memory = results["memory"]
        for name in ("reward_function", "reward_head", "reward_model"):
            console.print(f"memory, {name}: train peak {format_bytes(memory[name]['train_peak_bytes'])}, "
                          f"{memory[name]['base_copies']} base copies")
        extra = memory["reward_model_extra"]
        console.print(f"external reward model: +{format_bytes(extra['measured_bytes'])} measured, "
                      f"+{format_bytes(extra['estimated_bytes'])} estimated ({extra['estimate_error']:+.1%})")
    if results["min_accuracy_gain"] is not None:
        console.print(f"min accuracy gain over {', '.join(o for o in PAIR if o in runs)}: "
                      f"{results['min_accuracy_gain']:+.1%}")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
