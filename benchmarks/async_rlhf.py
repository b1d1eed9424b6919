"""Synchronous against asynchronous off-policy training (``async_generation``), on this machine, at the settings a
user runs.

    python benchmarks/async_rlhf.py --json runs/async/async.json

**Speed and memory.** The PPO recipe (``recipes/configs/ppo_smollm2.yaml``, 16 prompts x 48 new tokens, 2 epochs
of minibatch 8), from one shared Hydra-SFT checkpoint, at 11 iterations (``--speed_iterations`` to
change), run three ways one after another: synchronous; async on one device (the generator a child process sharing the base); async on two
processes (``accelerate launch --multi_gpu --num_processes 2``). Every run generates the same number of samples
and takes the same optimizer steps. Training seconds are the loop's (the sum of ``speed/iteration_seconds``:
model loading and evaluation excluded; the generator's start-up is inside); ``speedup`` is sync / async on one
device. Memory is the peak PSS (proportional set size) of the run's process tree, sampled every 0.2 s: memory
two processes share counts once; beside it, the bytes the learner and its generator child both map (the base)
and the generator's own memory (USS).

**Robustness to staleness** (the paper's curve at our scale): each of ``--objectives`` with its own recipe and
iteration count, at ``--staleness`` 0 (the synchronous loop), 1, 2 and 4, with the held-out evaluation the
recipe runs (gold gain and win-rate against the SFT start, greedy, 100 prompts).

``--set key=value`` passes a flag to every run and ``--sft_set`` to the SFT run (the tests shrink everything to
a tiny model with them); ``--reuse`` reads robustness runs already finished in ``output_dir``.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from hydra_rlhf.evaluate import quality
from hydra_rlhf.experiments import EQUAL_BUDGET, ROOT, as_flags, cuda_available, ensure_sft, write_json
from hydra_rlhf.memory.profiler import format_bytes, process_tree_pss, torch_shared_bytes, wide_console

SPEED_TARGET = 1 / 0.75  # async takes at least 25% less time
DPO_TOLERANCE = 0.05  # online DPO at staleness 1 within this much gold of its synchronous run
LAYOUTS = ("sync", "async", "async_two_processes")


def launch(command: list[str], output: Path) -> dict:
    """Run one recipe, sampling its process tree's PSS; returns its summary, metrics and the measurements."""
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, shared, private = [0], [0], [0]

    def sample() -> None:
        samples = 0
        while process.poll() is None:
            peak[0] = max(peak[0], process_tree_pss(process.pid))
            if not shared[0] or samples % 10 == 0:  # what the learner and its generator child map together
                both, generator_own = _generator_memory(process.pid)
                shared[0], private[0] = max(shared[0], both), max(private[0], generator_own)
            samples += 1
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    sampler.join()
    if process.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed ({process.returncode}):\n{stderr[-3000:]}")
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {"summary": json.loads((output / "summary.json").read_text()), "metrics": metrics,
            "wall_seconds": time.perf_counter() - started, "peak_pss_bytes": peak[0], "shared_bytes": shared[0],
            "generator_private_bytes": private[0],
            "train_seconds": sum(m["speed/iteration_seconds"] for m in metrics)}


def _generator_memory(pid: int) -> tuple[int, int]:
    """(bytes of torch shared memory the learner ``pid`` and its generator child both map, the generator's own
    memory: its USS, what it alone holds); (0, 0) without a child."""
    import psutil

    try:
        children = [c for c in psutil.Process(pid).children() if "spawn_main" in " ".join(c.cmdline())]
        if not children:
            return 0, 0
        return torch_shared_bytes(children[0].pid, pid), children[0].memory_full_info().uss
    except psutil.Error:  # the run ended meanwhile
        return 0, 0


def recipe(config: str, sft: Path, output: Path, flags: list[str]) -> list[str]:
    return ["recipes/ppo.py", "--config", config, "--model_name_or_path", str(sft), "--output_dir", str(output), *flags]


def speed(args, flags: list[str]) -> dict:
    """Sync, async on one device, async on two processes: the same PPO recipe, measured one after another."""
    iterations = ["--max_iterations", str(args.speed_iterations)] if args.speed_iterations else []
    base = [*EQUAL_BUDGET, *flags, *iterations, "--eval_prompts_path", "", "--save_every", "0"]  # (the speed runs' own win)
    layouts = {
        "sync": [sys.executable],
        "async": [sys.executable],
        # any free port: accelerate's default (29500) refuses to start beside another launch
        "async_two_processes": [str(Path(sys.executable).parent / "accelerate"), "launch", "--main_process_port", "0",
                                "--multi_gpu", "--num_processes", "2"],
    }
    rows = {}
    for name in args.layouts:
        launcher = layouts[name]
        print(f"speed: {name} ...", flush=True)
        extra = [] if name == "sync" else ["--async_generation", "true", "--max_staleness", "1"]
        output = args.output_dir / "speed" / name
        measured = launch([*launcher, *recipe(args.speed_config, args.sft, output, [*base, *extra])], output)
        metrics = measured["metrics"]
        rows[name] = {
            "iterations": len(metrics),
            "responses_generated": int(sum(m["response/count"] for m in metrics)),
            "train_seconds": measured["train_seconds"],
            "seconds_per_iteration": measured["train_seconds"] / len(metrics),
            "wall_seconds": measured["wall_seconds"],
            "peak_pss_bytes": measured["peak_pss_bytes"],
            "base_bytes_shared_with_generator": measured["shared_bytes"],
            "generator_private_bytes": measured["generator_private_bytes"],
            "learner_peak_bytes": measured["summary"]["peak_bytes"],
            "reward_per_iteration": [m["objective/reward"] for m in metrics],
        }
        if name != "sync":
            rows[name].update({
                "staleness": [m["async/staleness"] for m in metrics],
                "learner_wait_seconds": sum(m["async/wait_seconds"] for m in metrics),
                "generator_seconds_per_batch": sum(m["async/generate_seconds"] for m in metrics) / len(metrics),
                "sync_bytes": max(m["async/sync_bytes"] for m in metrics),
                "sync_seconds": max(m["async/sync_seconds"] for m in metrics),
                "load_seconds": max(m["async/load_seconds"] for m in metrics),
            })
        print(json.dumps({k: v for k, v in rows[name].items() if not isinstance(v, list)}), flush=True)
    return rows


def robustness(args, flags: list[str]) -> dict:
    """Each objective's recipe at each staleness (0: the synchronous loop), evaluated on held-out prompts."""
    table: dict[str, dict[str, dict]] = {}
    for objective in args.objectives:
        for staleness in args.staleness:
            output = args.output_dir / "robustness" / f"{objective}_staleness{staleness}"
            extra = ["--async_generation", "true", "--max_staleness", str(staleness)] if staleness else []
            print(f"robustness: {objective}, staleness {staleness} ...", flush=True)
            if args.reuse and (output / "summary.json").is_file():
                summary = json.loads((output / "summary.json").read_text())
                seconds = summary["wall_seconds"]
            else:
                measured = launch([sys.executable, *recipe(args.config_pattern.format(objective=objective), args.sft,
                                                            output, [*EQUAL_BUDGET, *extra, *flags])], output)
                summary, seconds = measured["summary"], measured["wall_seconds"]
            table.setdefault(objective, {})[str(staleness)] = {**quality(summary), "wall_seconds": seconds}
            print(json.dumps({"objective": objective, "staleness": staleness,
                              **table[objective][str(staleness)]}), flush=True)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", type=Path, default=Path("runs/async/sft"), help="The shared Hydra-SFT checkpoint "
                        "(made here with --sft_config if absent).")
    parser.add_argument("--sft_config", default="recipes/configs/sft_smollm2.yaml")
    parser.add_argument("--speed_config", default="recipes/configs/ppo_smollm2.yaml")
    parser.add_argument("--speed_iterations", type=int, help="Iterations of each speed run (default: the recipe's).")
    parser.add_argument("--config_pattern", default="recipes/configs/{objective}_smollm2.yaml")
    parser.add_argument("--objectives", default="ppo,rloo,online_dpo")
    parser.add_argument("--staleness", default="0,1,2,4", help="Comma-separated; 0 is the synchronous loop. Empty: "
                        "skip the robustness runs.")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/async"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="A flag for every run.")
    parser.add_argument("--sft_set", action="append", default=[], metavar="KEY=VALUE", help="A flag for the SFT run.")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="The speed runs to make.")
    parser.add_argument("--skip_speed", action="store_true", help="Only the robustness runs.")
    parser.add_argument("--reuse", action="store_true", help="Read robustness runs already finished in output_dir.")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    args = parser.parse_args(argv)
    args.objectives = [o for o in args.objectives.split(",") if o]
    args.layouts = [name for name in args.layouts.split(",") if name]
    if set(args.layouts) - set(LAYOUTS):
        parser.error(f"unknown layout in {args.layouts}: use a comma-separated subset of {','.join(LAYOUTS)}")
    args.staleness = [int(s) for s in args.staleness.split(",") if s]
    flags = as_flags(args.set)
    ensure_sft(args.sft, args.sft_config, as_flags(args.sft_set))
    machine = "cuda" if cuda_available() else f"{os.cpu_count()} CPU cores"
    results = {"machine": machine, "speed": {}, "robustness": {}}
    if not args.skip_speed:
        rows = results["speed"] = speed(args, flags)
        if {"sync", "async"} <= set(rows):
            results["speedup"] = rows["sync"]["train_seconds"] / rows["async"]["train_seconds"]
            results["peak_pss_ratio_async_vs_sync"] = rows["async"]["peak_pss_bytes"] / max(rows["sync"]["peak_pss_bytes"], 1)
            results["speed_target_met"] = results["speedup"] >= SPEED_TARGET
        if {"sync", "async_two_processes"} <= set(rows):
            results["speedup_two_processes"] = rows["sync"]["train_seconds"] / rows["async_two_processes"]["train_seconds"]
    if args.staleness:
        table = results["robustness"] = robustness(args, flags)
        dpo = table.get("online_dpo", {})
        if "0" in dpo and "1" in dpo:
            results["online_dpo_staleness1_gold_delta"] = dpo["1"]["gold_gain"] - dpo["0"]["gold_gain"]
            results["online_dpo_target_met"] = abs(results["online_dpo_staleness1_gold_delta"]) <= DPO_TOLERANCE
    print_tables(results)
    write_json(args.json, results)
    return 0


def print_tables(results: dict) -> None:
    from rich.table import Table

    console = wide_console()
    if results["speed"]:
        table = Table(title="Synchronous vs asynchronous, equal samples and optimizer steps")
        for column in ("layout", "iterations", "responses", "train s", "s / iteration", "x sync", "peak PSS",
                       "base shared", "generator's own", "staleness"):
            table.add_column(column, justify="left" if column == "layout" else "right")
        sync = results["speed"]["sync"]["train_seconds"]
        for name, row in results["speed"].items():
            table.add_row(name, str(row["iterations"]), str(row["responses_generated"]), f"{row['train_seconds']:.0f}",
                          f"{row['seconds_per_iteration']:.1f}", f"{sync / row['train_seconds']:.2f}",
                          format_bytes(row["peak_pss_bytes"]), format_bytes(row["base_bytes_shared_with_generator"]),
                          format_bytes(row["generator_private_bytes"]),
                          ",".join(f"{s:g}" for s in row.get("staleness", [])) or "0")
        console.print(table)
    if results["robustness"]:
        table = Table(title="Held-out gold gain (win-rate) by staleness; 0 = synchronous")
        staleness = sorted({s for rows in results["robustness"].values() for s in rows}, key=int)
        table.add_column("objective")
        for s in staleness:
            table.add_column(f"staleness {s}", justify="right")
        for objective, rows in results["robustness"].items():
            table.add_row(objective, *[f"{rows[s]['gold_gain']:+.3f} ({rows[s]['win_rate_vs_sft']:.0%})" if s in rows
                                       else "" for s in staleness])
        console.print(table)


if __name__ == "__main__":
    sys.exit(main())
