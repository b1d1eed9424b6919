"""Every objective from the same Hydra-SFT checkpoint, at an equal budget of generated responses, on this machine.

    python benchmarks/objectives.py --json runs/objectives/objectives.json

For each objective, the recipe a user runs (``recipes/ppo.py --config recipes/configs/<objective>_smollm2.yaml``,
16 responses per iteration: PPO 16 prompts x 1, RLOO and GRPO 4 x 4, online DPO 8 x 2) on one shared Hydra-SFT
checkpoint (made by ``recipes/sft.py`` with ``recipes/configs/sft_smollm2.yaml`` if ``--sft`` holds none), then
the held-out evaluation the recipe runs itself. One table: gold gain, win-rate against the SFT start,
distinct-2 ratio, KL to the reference, wall time, peak memory per stage, and whether the demo's three targets
(gold >= +0.30, win-rate >= 70%, distinct-2 >= 0.7x) are met. ``--set key=value`` passes a flag to every run
and ``--sft_set key=value`` one to the SFT run (the tests use them to shrink everything to a tiny model).
"""

import argparse
import json
import sys
from pathlib import Path

from hydra_rlhf.evaluate import TARGETS, quality
from hydra_rlhf.experiments import (EQUAL_BUDGET, add_run_arguments, as_flags, cuda_available, ensure_sft,
                                    run_rl_recipe, write_json)
from hydra_rlhf.layout import OBJECTIVES, STAGES
from hydra_rlhf.memory.profiler import format_bytes, wide_console


def run_objective(name: str, args, overrides: list[str]) -> dict:
    output = args.output_dir / name
    config = args.config_pattern.format(objective=name)
    summary, seconds = run_rl_recipe(output, config, ["--model_name_or_path", str(args.sft), *EQUAL_BUDGET,
                                                          *overrides], args.reuse)
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    row = {
        "objective": name,
        "config": config,
        "critic": OBJECTIVES[name].critic,
        "responses_generated": int(sum(m["response/count"] for m in metrics)),
        **quality(summary),
        "wall_seconds": seconds,
        "train_seconds_per_iteration": sum(m["speed/iteration_seconds"] for m in metrics) / len(metrics),
        "peak_bytes": summary["peak_bytes"],
        "stages": {stage: summary["memory"][stage]["peak_bytes"] for stage in STAGES if stage in summary["memory"]},
        "stage_seconds": {stage: summary["memory"][stage]["seconds"] for stage in STAGES if stage in summary["memory"]},
        "base_copies": summary["base_copies"],
        "frozen_base_unchanged": summary["frozen_base_unchanged"],
    }
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="Comma-separated objectives to run.")
    parser.add_argument("--sft", type=Path, default=Path("runs/objectives/sft"), help="The shared Hydra-SFT "
                        "checkpoint (made here if absent).")
    add_run_arguments(parser, "runs/objectives")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        parser.error(f"unknown objective {unknown[0]!r}: use a comma-separated subset of {','.join(OBJECTIVES)}")
    ensure_sft(args.sft, args.sft_config, as_flags(args.sft_set))
    rows = []
    for name in names:
        print(f"{name} ...", flush=True)
        rows.append(run_objective(name, args, as_flags(args.set)))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("stages", "stage_seconds")}), flush=True)
    ppo = next((r for r in rows if r["objective"] == "ppo"), None)
    for row in rows:
        if ppo is not None:
            row["train_peak_minus_ppo_bytes"] = row["stages"]["train"] - ppo["stages"]["train"]
    print_table(rows)
    write_json(args.json, {"device": "cuda" if cuda_available() else "cpu", "targets": TARGETS,
                           "objectives": {r["objective"]: r for r in rows}})
    return 0


def print_table(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="Objectives at an equal budget of generated responses (held-out prompts, greedy)")
    for column in ("objective", "responses", "gold gain", "win-rate", "distinct-2 x", "KL (nats)", "wall",
                   *STAGES[:5], "targets"):
        table.add_column(column, justify="left" if column == "objective" else "right")
    for r in rows:
        table.add_row(r["objective"], str(r["responses_generated"]), f"{r['gold_gain']:+.3f}",
                      f"{r['win_rate_vs_sft']:.0%}", f"{r['distinct2_ratio']:.2f}", f"{r['kl_to_reference']:.1f}",
                      f"{r['wall_seconds']:.0f} s", *[format_bytes(r["stages"].get(s, 0)) for s in STAGES[:5]],
                      "met" if r["meets_targets"] else "missed")
    wide_console().print(table)


if __name__ == "__main__":
    sys.exit(main())
