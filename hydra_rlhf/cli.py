"""The ``hydra-rlhf`` command: where an RL iteration's memory goes, measured (``profile``), predicted (``estimate``),
or read back from a finished run (``report``); and how a run's checkpoints score on held-out prompts (``evaluate``).
``profile`` and ``estimate`` take a run's shape in the recipes' keys (``--batch-size`` counts prompts).

    hydra-rlhf profile --modes full,lora,j-hydra,hydra --json runs/profile.json
    hydra-rlhf profile --modes hydra --objective ppo,grpo --batch-size 2 --num-samples-per-prompt 4 --json runs/obj.json
    hydra-rlhf estimate --preset llama-3.1-8b --quantization 4bit --batch-size 8 --gradient-checkpointing
    hydra-rlhf estimate --preset llama-3.1-8b --quant 4bit --objective all --batch-size 2 --num-samples-per-prompt 4
    hydra-rlhf estimate --preset llama-3.1-70b --quantization 4bit --batch-size 4 --gradient-checkpointing --all-levers
    hydra-rlhf profile --modes hydra --gradient-checkpointing --logprob-chunk-size 256 --optim adamw_bnb_8bit
    hydra-rlhf profile --modes hydra --objective grpo --batch-size 4 --memory-budget 1GiB
    hydra-rlhf estimate --preset llama-3.1-8b --quantization 4bit --batch-size 8 --gpu T4
    hydra-rlhf report runs/demo/ppo
    hydra-rlhf evaluate runs/demo/ppo --json runs/demo/checkpoints_eval.json
    hydra-rlhf evaluate runs/grpo-arithmetic --prompts arithmetic:eval --num-prompts 100 --max-prompt-length 80 \
        --reward-funcs accuracy"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hydra-rlhf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    from .memory.arguments import add_budget_arguments, add_run_shape_arguments
    from .memory.profile import ProfileSettings
    from .memory.report import add_estimate_arguments, run_estimate

    profile = commands.add_parser("profile", help="Run a few iterations per mode and compare memory per stage.")
    profile.add_argument("--model", default="smollm2-135m", help="Short name, local path or hub id.")
    profile.add_argument("--modes", default="full,lora,j-hydra,hydra", help="Comma-separated modes to compare.")
    profile.add_argument("--objective", dest="objectives", default="ppo", help="Comma-separated objectives (ppo, "
                         "rloo, grpo, online_dpo): ppo builds a critic, the others do not. Each samples its own k per "
                         "prompt unless --num-samples-per-prompt is given.")
    add_run_shape_arguments(profile, ProfileSettings)
    add_budget_arguments(profile, gpu=False)
    profile.add_argument("--iterations", type=int, default=2)
    profile.add_argument("--prompts", default="demo:train", help="Prompt source (bundled name or file).")
    profile.add_argument("--json", type=Path, help="Write the results here.")
    profile.add_argument("--plot", type=Path, help="PNG bar chart (default: next to --json, or profile.png).")
    profile.set_defaults(handler=run_profile)

    estimate = commands.add_parser("estimate", help="Predict per-stage memory for a model you cannot load here.")
    add_estimate_arguments(estimate)
    estimate.set_defaults(handler=run_estimate)

    report = commands.add_parser("report", help="The memory table of a finished training run.")
    report.add_argument("run_dir", type=Path, help="A run's output_dir (holds memory.jsonl).")
    report.add_argument("--json", type=Path, help="Write the per-stage summary here.")
    report.set_defaults(handler=run_report)

    evaluate = commands.add_parser("evaluate", help="Score saved checkpoints on held-out prompts: the demo's gold "
                                   "judge (win-rate against the SFT start, KL to the reference, distinct-2), or "
                                   "the reward functions you name (e.g. accuracy on a verifiable task).")
    evaluate.add_argument("checkpoints", nargs="+", type=Path,
                          help="Checkpoint directories, or a run's output_dir (all its checkpoints, oldest first).")
    evaluate.add_argument("--prompts", default="demo:eval", help="Held-out prompt source (bundled name or file).")
    evaluate.add_argument("--prompt-column", default="prompt")
    evaluate.add_argument("--num-prompts", type=positive_int, help="Use only the first N prompts.")
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=48, help="Greedy response cap (tokens).")
    evaluate.add_argument("--max-prompt-length", type=positive_int, default=64, help="Prompts are cut from the left to this.")
    evaluate.add_argument("--reward-funcs", nargs="+", metavar="SPEC",
                          help="Score with these reward functions instead of the gold judge, as the recipes' "
                               "reward_funcs (a built-in such as accuracy, package.module:function or "
                               "file.py:function); the prompts' other columns (e.g. answer) reach them.")
    evaluate.add_argument("--reward-weights", nargs="+", type=float, metavar="W",
                          help="One weight per reward function (default 1 each) for the weighted sum.")
    evaluate.add_argument("--json", type=Path, help="Write the results (per checkpoint) here.")
    evaluate.set_defaults(handler=run_evaluate)

    args = parser.parse_args(argv)
    from .errors import error_boundary

    return error_boundary(args.handler, args)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into 'invalid positive_int value')."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def run_profile(args) -> int:
    from .memory.arguments import set_levers, settings_from_args
    from .memory.profile import ProfileSettings, profile

    # the shape first: a refused setting is one line before torch loads
    settings = settings_from_args(ProfileSettings, args, modes=comma_list(args.modes),
                                  objectives=comma_list(args.objectives), fixed_levers=set_levers(args))
    from .memory.profiler import format_bytes, stage_table, wide_console
    from .plots import plot_memory

    console = wide_console()
    results = profile(settings, progress=lambda mode: console.print(f"[bold]profiling {mode}[/bold] ..."))
    modes = results["modes"]
    console.print(stage_table({m: r["stages"] for m, r in modes.items()}, title="Memory per stage, by mode"))
    for mode, result in modes.items():
        console.print(f"{mode:8s} peak {format_bytes(result['peak_bytes']):>12s}  base copies {result['base_copies']}  "
                      f"frozen base unchanged {result['frozen_base_unchanged']}  "
                      f"{result['seconds_per_sample']:.2f} s/sample")
    for name, ratio in results["ratios"].items():
        console.print(f"peak {name}: {ratio:.3f}")
    console.print(f"device: {results['device']}; measure: {results['measure']}")
    plot_path = args.plot or (args.json.with_suffix(".png") if args.json else Path("profile.png"))
    plot_memory({m: r["stages"] for m, r in modes.items()}, plot_path)
    console.print(f"chart: {plot_path}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        console.print(f"json: {args.json}")
    return 0


def run_report(args) -> int:
    from .memory.profiler import read_memory_log, stage_table, summarize, wide_console

    log = args.run_dir / "memory.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{log} not found; pass a training run's output_dir (it needs profile_memory: true).")
    measure, history = read_memory_log(log)
    if not history:
        raise ValueError(f"{log} holds no memory records yet: the run has not finished an iteration.")
    summary = summarize(history)
    console = wide_console()
    console.print(stage_table({args.run_dir.name: summary}, title=f"Memory per stage over {len(history)} iterations"))
    console.print(f"measure: {measure}")
    if args.json:
        args.json.write_text(json.dumps({"measure": measure, "iterations": len(history), "stages": summary,
                                         "peak_bytes": max(s["peak_bytes"] for s in summary.values())}, indent=2))
    return 0


def run_evaluate(args) -> int:
    from .data import load_prompt_rows
    from .evaluate import checkpoint_dirs, evaluate_checkpoints
    from .memory.profiler import wide_console

    console = wide_console()
    rows = load_prompt_rows(args.prompts, args.prompt_column, args.num_prompts)
    scorer = reward_scorer(args, rows)  # a bad spec or a column the prompts lack: one line before any model loads
    paths = checkpoint_dirs(args.checkpoints)
    if not paths:
        raise FileNotFoundError(f"no checkpoints under {', '.join(map(str, args.checkpoints))}/checkpoints")
    table, labels = evaluation_table(scorer), checkpoint_labels(paths)
    results, failed = {}, {}
    for path, result, problem in evaluate_checkpoints(paths, rows, args.max_new_tokens, args.max_prompt_length,
                                                      scorer):
        if problem is not None:  # the others are still scored, and written
            console.print(f"[red]skipped {path}: {problem}[/red]")
            failed[str(path)] = problem
            continue
        results[str(path)] = result
        add_evaluation_row(table, labels[path], result, scorer)
        console.print(f"evaluated {path}: " + (f"reward {result['reward_after']:.3f}" if scorer
                                               else f"gold {result['gold_after']:.3f}"))
    if results:
        first = next(iter(results.values()))
        console.print(table)
        console.print(f"start: {start_summary(first, scorer)} over {first['num_prompts']} prompts")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**results, **({"failed": failed} if failed else {})}, indent=2))
    if failed:
        print(f"error: could not score {len(failed)} of {len(paths)} checkpoint(s): "
              + "; ".join(f"{labels[Path(p)]}: {why}" for p, why in failed.items()), file=sys.stderr)
        return 1
    return 0


def checkpoint_labels(paths: list[Path]) -> dict[Path, str]:
    """Each checkpoint's name in the table: its directory name, or, where several runs' checkpoints share names
    (``iter-000012`` of three seeds), its path below the directory they share."""
    names = [path.name for path in paths]
    if len(set(names)) == len(names):
        return dict(zip(paths, names))
    common = Path(os.path.commonpath([path.resolve() for path in paths]))
    return {path: str(path.resolve().relative_to(common)) for path in paths}


def reward_scorer(args, rows):
    """``--reward-funcs`` as a run's reward sources over the held-out rows (None: the gold judge scores)."""
    if not args.reward_funcs:
        if args.reward_weights:
            raise ValueError("--reward-weights needs --reward-funcs: name the functions they weight.")
        return None
    from .config import RLConfig
    from .rewards.scorer import RewardScorer

    config = RLConfig(reward_funcs=args.reward_funcs, reward_weights=args.reward_weights, reward_head_weight=0,
                      max_new_tokens=args.max_new_tokens)
    scorer = RewardScorer(config, None, rows)  # the tokenizer is each checkpoint's own
    scorer.start("cpu")  # functions only: nothing to place on a device
    return scorer


def evaluation_table(scorer):
    from rich.table import Table

    if scorer is None:
        columns = ("checkpoint", "gold", "gain", "win-rate", "distinct-2", "x start", "KL (nats)", "reward head")
        title = "Held-out evaluation per checkpoint (greedy; start = the SFT policy, adapters off)"
    else:
        columns = ("checkpoint", "reward", "gain", *scorer.names)
        title = "Held-out reward per checkpoint (greedy; start = adapters off)"
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    return table


def add_evaluation_row(table, name: str, result: dict, scorer) -> None:
    if scorer is not None:
        table.add_row(name, f"{result['reward_after']:.3f}", f"{result['reward_after'] - result['reward_before']:+.3f}",
                      *(format_mean(result[f"{source}_after"]) for source in scorer.names))
        return
    table.add_row(name, f"{result['gold_after']:.3f}", f"{result['gold_gain']:+.3f}",
                  f"{result['win_rate_vs_sft']:.0%}", f"{result['distinct2_after']:.3f}",
                  f"{result['distinct2_after'] / max(result['distinct2_before'], 1e-9):.2f}",
                  f"{result['kl_to_reference']:.2f}", f"{result['reward_head_after']:.3f}")


def start_summary(result: dict, scorer) -> str:
    """The starting policy's figures, shared by every checkpoint of one base."""
    if scorer is None:
        return f"gold {result['gold_before']:.3f}, distinct-2 {result['distinct2_before']:.3f}"
    sources = ", ".join(f"{name} {format_mean(result[f'{name}_before'])}" for name in scorer.names)
    return f"reward {result['reward_before']:.3f} ({sources})"


def format_mean(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
