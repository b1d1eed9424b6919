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
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra_rlhf.layout import OBJECTIVES, STAGES  # noqa: E402
from hydra_rlhf.memory.profiler import format_bytes, wide_console  # noqa: E402

TARGETS = {"gold_gain": 0.30, "win_rate_vs_sft": 0.70, "distinct2_ratio": 0.70}
# The comparisons at an equal budget: 11 iterations of 16 responses each, whatever KL a run reaches (the PPO
# recipe's own stop_at_kl would end some runs sooner than others).
EQUAL_BUDGET = ["--max_iterations", "11", "--stop_at_kl", "None"]


def run(args: list[str]) -> None:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def ensure_sft(sft_dir: Path, sft_config: str, overrides: list[str], objective: str = "hydra") -> None:
    """An SFT checkpoint in ``sft_dir`` (objective hydra: policy and reward head in one; sft or reward: the
    baselines' two models), made by ``recipes/sft.py`` unless one is there already."""
    if (sft_dir / "sft_summary.json").is_file():
        return
    print(f"SFT ({objective}) into {sft_dir} ...", flush=True)
    run(["recipes/sft.py", "--config", sft_config, "--output_dir", str(sft_dir), "--objective", objective, *overrides])


def run_rl(output: Path, config: str, flags: list[str], reuse: bool) -> tuple[dict, float]:
    """``recipes/ppo.py --config config --output_dir output *flags``: its summary.json and wall seconds. With
    ``reuse``, a finished run in ``output`` is read instead (its own wall time)."""
    if reuse and (output / "summary.json").is_file():  # a finished run of the same config: read, not rerun
        summary = json.loads((output / "summary.json").read_text())
        return summary, summary["wall_seconds"]
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    run(["recipes/ppo.py", "--config", config, "--output_dir", str(output), *flags])
    return json.loads((output / "summary.json").read_text()), time.perf_counter() - started


def quality(summary: dict) -> dict:
    """A run's held-out figures, in the terms of the demo's targets (``TARGETS``)."""
    evaluation = summary["eval"]
    row = {
        "iterations": summary["iterations"],
        "gold_before": evaluation["gold_before"],
        "gold_gain": evaluation["gold_gain"],
        "win_rate_vs_sft": evaluation["win_rate_vs_sft"],
        "distinct2_ratio": evaluation["distinct2_after"] / max(evaluation["distinct2_before"], 1e-9),
        "kl_to_reference": evaluation["kl_to_reference"],
    }
    row["meets_targets"] = all(row[key] >= bound for key, bound in TARGETS.items())
    return row


def run_objective(name: str, args, overrides: list[str]) -> dict:
    output = args.output_dir / name
    config = args.config_pattern.format(objective=name)
    summary, seconds = run_rl(output, config, ["--model_name_or_path", str(args.sft), *EQUAL_BUDGET, *overrides],
                              args.reuse)
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
    write_json(args.json, {"device": "cpu" if not _cuda() else "cuda", "targets": TARGETS,
                           "objectives": {r["objective"]: r for r in rows}})
    return 0


def add_run_arguments(parser: argparse.ArgumentParser, output_dir: str) -> None:
    """The flags every benchmark that runs the recipes shares."""
    parser.add_argument("--sft_config", default="recipes/configs/sft_smollm2.yaml")
    parser.add_argument("--config_pattern", default="recipes/configs/{objective}_smollm2.yaml")
    parser.add_argument("--output_dir", type=Path, default=Path(output_dir))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="A flag for every RL run, e.g. --set max_new_tokens=8.")
    parser.add_argument("--sft_set", action="append", default=[], metavar="KEY=VALUE", help="A flag for the SFT runs.")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    parser.add_argument("--reuse", action="store_true", help="Read the runs already finished in output_dir (same "
                        "configs) instead of running them again; their wall time is the run's own.")


def write_json(path: Path | None, results: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(f"json: {path}")


def as_flags(settings: list[str]) -> list[str]:
    """["key=value", ...] -> ["--key", "value", ...]"""
    flags = []
    for item in settings:
        key, _, value = item.partition("=")
        flags += [f"--{key}", value]
    return flags


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
