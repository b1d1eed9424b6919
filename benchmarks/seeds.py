"""The demo's claims across seeds: the RL recipe a user runs, seed after seed, per mode, with mean +- spread.

    python benchmarks/seeds.py --json runs/seeds/seeds.json
    python benchmarks/seeds.py --seeds 0,1,2,3,4 --modes hydra,lora --objectives ppo --json runs/seeds/seeds.json
    python benchmarks/seeds.py --modes hydra --objectives ppo,rloo,grpo,online_dpo --json runs/seeds/objectives.json

Each (mode, objective, seed) runs ``recipes/ppo.py --config recipes/configs/<objective>_smollm2.yaml --seed S``
and its own held-out evaluation (100 prompts, greedy). The SFT start is made once per mode and shared by every
seed (hydra and j-hydra: one Hydra-SFT checkpoint; lora and full: a plain SFT model and a separate reward model;
by ``recipes/sft.py`` with the demo's SFT config): the claim under test is the RL stage's, the SFT stage is the
same deterministic recipe whatever the RL seed, and one SFT per seed would add its own spread and ~3 minutes
per run. Reported per seed and as mean +- standard deviation (and the worst seed): gold gain, win-rate against
the SFT start, distinct-2 ratio, KL to the reference, iterations. The JSON's ``min_gold_gain`` is the worst
seed of hydra mode (its first objective); ``hydra_minus_lora`` is the paired gold difference, seed by seed.
``--set key=value`` passes a flag to every RL run and ``--sft_set key=value`` to the SFT runs (the tests
shrink everything to a tiny model with them); ``--reuse`` reads runs already finished in ``--output_dir``.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from hydra_rlhf.evaluate import TARGETS, quality
from hydra_rlhf.experiments import add_run_arguments, as_flags, cuda_available, ensure_sft, run_rl_recipe, write_json
from hydra_rlhf.layout import MODES, OBJECTIVES
from hydra_rlhf.memory.profiler import wide_console

FIGURES = ("gold_gain", "win_rate_vs_sft", "distinct2_ratio", "kl_to_reference", "iterations")


def sft_flags(mode: str, args) -> list[str]:
    """The mode's SFT start (made on first use), as flags of the RL recipe."""
    sft_set = as_flags(args.sft_set)
    if mode in ("hydra", "j-hydra"):
        ensure_sft(args.sft_dir / "hydra", args.sft_config, sft_set, "hydra")
        return ["--model_name_or_path", str(args.sft_dir / "hydra"), "--mode", mode]
    ensure_sft(args.sft_dir / "sft", args.sft_config, sft_set, "sft")
    ensure_sft(args.sft_dir / "rm", args.sft_config, sft_set, "reward")
    return ["--model_name_or_path", str(args.sft_dir / "sft"), "--mode", mode,
            "--reward_model_path", str(args.sft_dir / "rm")]


def spread(rows: list[dict]) -> dict:
    """Mean, standard deviation (n - 1), worst and best of each figure over the seeds."""
    result = {}
    for key in FIGURES:
        values = [row[key] for row in rows]
        result[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                       "min": min(values), "max": max(values)}
    result["seeds_meeting_targets"] = sum(row["meets_targets"] for row in rows)
    result["all_seeds_meet_targets"] = result["seeds_meeting_targets"] == len(rows)
    return result


def sweep(args) -> dict:
    runs: dict[str, list[dict]] = {}
    flags = as_flags(args.set)
    for mode in args.modes:
        start = sft_flags(mode, args)
        for objective in args.objectives:
            group = runs.setdefault(f"{mode}/{objective}", [])
            for seed in args.seeds:
                print(f"{mode} {objective} seed {seed} ...", flush=True)
                output = args.output_dir / mode / objective / f"seed{seed}"
                summary, seconds = run_rl_recipe(output, args.config_pattern.format(objective=objective),
                                                 [*start, "--seed", str(seed), *flags], args.reuse)
                group.append({"mode": mode, "objective": objective, "seed": seed, **quality(summary),
                              "wall_seconds": seconds})
                print(json.dumps(group[-1]), flush=True)
    results = {"device": "cuda" if cuda_available() else "cpu", "targets": TARGETS, "seeds": args.seeds,
               "runs": runs, "summary": {name: spread(rows) for name, rows in runs.items()}}
    first = f"hydra/{args.objectives[0]}"
    if first in runs:
        results["min_gold_gain"] = results["summary"][first]["gold_gain"]["min"]
        lora = {row["seed"]: row for row in runs.get(f"lora/{args.objectives[0]}", [])}
        if lora:  # paired: the same seed's prompt order and sampling in both modes
            differences = [h["gold_gain"] - lora[h["seed"]]["gold_gain"] for h in runs[first] if h["seed"] in lora]
            results["hydra_minus_lora"] = {"gold_gain_mean": statistics.fmean(differences),
                                           "gold_gain_std": statistics.stdev(differences) if len(differences) > 1 else 0.0,
                                           "per_seed": differences}
    return results


def print_tables(results: dict) -> None:
    from rich.table import Table

    console = wide_console()
    per_seed = Table(title="Per seed (held-out prompts, greedy)")
    for column in ("mode", "objective", "seed", "gold gain", "win-rate", "distinct-2 x", "KL (nats)", "iterations",
                   "wall", "targets"):
        per_seed.add_column(column, justify="left" if column in ("mode", "objective") else "right")
    for rows in results["runs"].values():
        for r in rows:
            per_seed.add_row(r["mode"], r["objective"], str(r["seed"]), f"{r['gold_gain']:+.3f}",
                             f"{r['win_rate_vs_sft']:.1%}", f"{r['distinct2_ratio']:.2f}", f"{r['kl_to_reference']:.1f}",
                             str(r["iterations"]), f"{r['wall_seconds']:.0f} s", "met" if r["meets_targets"] else "missed")
    console.print(per_seed)
    summary = Table(title=f"Mean +- std over {len(results['seeds'])} seeds (worst seed)")
    for column in ("run", "gold gain", "win-rate", "distinct-2 x", "KL (nats)", "iterations", "seeds meeting targets"):
        summary.add_column(column, justify="left" if column == "run" else "right")
    for name, s in results["summary"].items():
        summary.add_row(name, *[f"{s[k]['mean']:.3f} +- {s[k]['std']:.3f} ({s[k]['min']:.3f})" for k in FIGURES[:4]],
                        f"{s['iterations']['mean']:.1f} ({s['iterations']['min']}-{s['iterations']['max']})",
                        f"{s['seeds_meeting_targets']} of {len(results['seeds'])}")
    console.print(summary)
    if "hydra_minus_lora" in results:
        d = results["hydra_minus_lora"]
        console.print(f"hydra - lora gold gain, paired by seed: {d['gold_gain_mean']:+.3f} +- {d['gold_gain_std']:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="Comma-separated RL seeds.")
    parser.add_argument("--modes", default="hydra,lora", help=f"Comma-separated, of {','.join(MODES)}.")
    parser.add_argument("--objectives", default="ppo", help=f"Comma-separated, of {','.join(OBJECTIVES)}.")
    parser.add_argument("--sft_dir", type=Path, help="The shared SFT starts: hydra/, sft/ and rm/ under it (made "
                        "where absent; default: <output_dir>/sft).")
    add_run_arguments(parser, "runs/seeds")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    for given, known, flag in ((args.modes, MODES, "--modes"), (args.objectives, OBJECTIVES, "--objectives")):
        unknown = [name for name in given if name not in known]
        if unknown or not given:
            parser.error(f"{flag}: unknown or empty {unknown[0] if unknown else ''!r}: use a comma-separated subset "
                         f"of {','.join(known)}")
    if not args.seeds:
        parser.error("--seeds: give at least one seed")
    args.sft_dir = args.sft_dir or args.output_dir / "sft"
    results = sweep(args)
    print_tables(results)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
