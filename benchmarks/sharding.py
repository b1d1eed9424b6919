"""One process against 2 sharded ranks (``sharding fsdp2``) on the same global batch: per-rank memory, base
bytes, seconds per iteration, how far the trained weights differ, and the estimate of one rank.

    python benchmarks/sharding.py --json runs/sharding/sharding.json
    python benchmarks/sharding.py --quantization 4bit --json runs/sharding/sharding-4bit.json
    python benchmarks/sharding.py --quantization 4bit --dtype bfloat16 --json runs/sharding/sharding-qlora-bf16.json
    torchrun --standalone --nproc_per_node 2 benchmarks/sharding.py worker smollm2-135m runs/sharding/fsdp2 --sharding fsdp2

Hydra-PPO (actor and critic adapters, value head, reference and reward from the adapters-off pass), fp32 on CPU
(``--quantization 4bit``: the base's linear layers in NF4, the rest fp32), gloo between the ranks. Stage 1 samples
one token (its forward gathers the weights as a run's does), then its responses are replaced by fixed ones, a
function of the iteration only, so one process (every row) and N ranks (each its 1/N of the rows) train on the
same global batch; stages 2-6 are the trainer's own. The whole sampler runs once, outside the timed iterations:
each rank samples 2 rows, to different lengths (rank r to 3 + 4r tokens), so an early rank must keep stepping with
the others (its seconds are reported).
Memory per rank is the profiler's (live tensor storages per stage; FSDP's gathered weights included) and the peak
resident set size of each process. ``worker`` is one such run; tests/test_sharding.py runs it on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

TARGET_BASE_RATIO = 0.55  # 2 ranks: each holds at most this share of the one-process base bytes


def fixed_batch(iteration: int, rows: int, prompt: int, response: int):
    """(prompt_ids, prompt_mask, responses) of the global batch of ``iteration``; every third prompt left-padded."""
    generator = torch.Generator().manual_seed(1000 + iteration)
    prompt_ids = torch.randint(10, 1000, (rows, prompt), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[::3, : prompt // 3] = 0
    prompt_ids[prompt_mask == 0] = 0
    return prompt_ids, prompt_mask, torch.randint(10, 1000, (rows, response), generator=generator)


def worker(args: argparse.Namespace) -> None:
    """PPO iterations on the fixed global batch, on this process's share of its rows; rank 0 writes
    OUTPUT/result-<processes>.pt."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # a short timeout: a rank waiting on a collective the other never joins fails fast
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    rank = dist.get_rank() if world > 1 else 0

    from hydra_rlhf.config import HydraModelConfig, RLConfig
    from hydra_rlhf.experience import stages
    from hydra_rlhf.memory.profiler import storage_bytes, summarize
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.model.loading import load_tokenizer, resolve_model
    from hydra_rlhf.model.sharding import end_process_group, trained_state
    from hydra_rlhf.run import make_accelerator
    from hydra_rlhf.trainer import RLTrainer

    rows = args.rows // world
    config = RLConfig(prompts_path="unused", eval_prompts_path=None, batch_size=rows, minibatch_size=rows,
                      num_epochs=2, max_new_tokens=args.response, stop_at_eos=False, whiten_advantages=False,
                      max_iterations=args.iterations, save_every=args.save_every, save_final=args.save_every > 0,
                      output_dir=args.output, resume=args.resume,
                      sharding=args.sharding, seed=1, actor_lr=1e-3, critic_lr=1e-3)
    path = resolve_model(args.model)
    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=path, lora_r=args.lora_r,
                                                    quantization=args.quantization, dtype=args.dtype), seed=0)
    prompts = [[{"role": "user", "content": f"prompt {i}"}] for i in range(args.rows)]
    trainer = RLTrainer(model, load_tokenizer(path), config, prompts, make_accelerator())
    iterations_run = []

    def fixed_generate(model, prompt_ids, prompt_mask, generation_kwargs, eos_token_ids, **kwargs):
        iterations_run.append(trainer.iteration)
        # the real sampler for one token, so the stage gathers the weights as a run does; then the fixed responses
        model.generate(prompt_ids, prompt_mask, **{**generation_kwargs, "max_new_tokens": 1})
        mine = slice(rank * rows, (rank + 1) * rows)
        ids, mask, responses = (t[mine] for t in fixed_batch(trainer.iteration, args.rows, args.prompt, args.response))
        return stages.sampled_rollout(ids, mask, responses, eos_token_ids, 1)

    # the real sampler, with ranks that stop at different lengths (the early one keeps stepping with the others)
    ids, mask, _ = fixed_batch(0, args.rows, args.prompt, args.response)
    started = time.perf_counter()
    sampled = model.generate(ids[:2], mask[:2], max_new_tokens=3 + 4 * rank, do_sample=True, top_k=0,
                             pad_token_id=0).shape[1] - args.prompt
    generate_seconds = time.perf_counter() - started
    stages.generate = fixed_generate
    if args.kill_after:  # a rank dies (SIGKILL, no cleanup) right after checkpoint ``kill_after`` is on disk
        save = trainer.save_checkpoint

        def save_then_die():
            target = save()
            if trainer.iteration == args.kill_after and rank == world - 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return target

        trainer.save_checkpoint = save_then_die
    before = model.frozen_fingerprint()
    history = trainer.train()
    trainer.profiler.close()
    trained = trained_state(model)
    if trained is None:  # one process: the modules hold the whole weights
        trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    mine = {"base_bytes": storage_bytes(model.base_parameters()), "sampled": sampled,
            "generate_seconds": generate_seconds, "memory": summarize(trainer.profiler.history),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "iteration_seconds": [m["speed/iteration_seconds"] for m in history]}
    ranks = [mine] * world
    if world > 1:
        dist.all_gather_object(ranks, mine)
    result = {"trained": trained, "ranks": ranks, "sharding": trainer.sharding, "frozen_before": before,
              "frozen_after": model.frozen_fingerprint(), "hashes": trainer.trainable_hashes_across_ranks(),
              "iterations_run": iterations_run}
    if rank == 0:
        torch.save(result, Path(args.output) / f"result-{world}.pt")
    end_process_group()


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two runs' trained weights (the same names in both)."""
    if set(a) != set(b):
        raise ValueError(f"the runs trained different weights: {sorted(set(a) ^ set(b))[:4]}")
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def launch(args: argparse.Namespace, processes: int, output: Path, *extra: str) -> dict:
    """One worker run on ``processes`` ranks (torchrun beside this Python), its result read back."""
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(processes)]
    command = [*([sys.executable] if processes == 1 else torchrun), __file__, "worker", args.model, str(output),
               "--rows", str(args.rows), "--prompt", str(args.prompt), "--response", str(args.response),
               "--iterations", str(args.iterations), "--lora-r", str(args.lora_r),
               "--quantization", args.quantization, "--dtype", args.dtype, *extra]
    output.mkdir(parents=True, exist_ok=True)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return torch.load(output / f"result-{processes}.pt", weights_only=True)


def estimate_per_rank(args: argparse.Namespace, processes: int, sharding: str) -> dict[str, int]:
    from hydra_rlhf.memory.formulas import estimate
    from hydra_rlhf.memory.shape import EstimateSettings, ModelShape
    from hydra_rlhf.model.loading import resolve_model

    settings = EstimateSettings(mode="hydra", objective="ppo", dtype=args.dtype, device="cpu", lora_r=args.lora_r,
                                batch_size=args.rows // processes, max_prompt_length=args.prompt,
                                max_new_tokens=args.response, gpus=processes, sharding=sharding,
                                quantization=args.quantization)
    return estimate(ModelShape.from_config(resolve_model(args.model)), settings).stages


def summarize_rank(rank: dict, estimated: dict[str, int]) -> dict:
    """One rank's figures; the estimate against the profiler in the stages the fixed batch runs for real (its
    generate stage samples nothing)."""
    measured = {stage: values["peak_bytes"] for stage, values in rank["memory"].items()}
    compared = {stage: {"estimated_bytes": estimated[stage], "measured_bytes": measured[stage],
                        "relative_error": estimated[stage] / measured[stage] - 1}
                for stage in ("score_frozen", "score_policy", "train", "log") if stage in measured}
    seconds = rank["iteration_seconds"][1:] or rank["iteration_seconds"]  # the first one warms up
    return {"base_bytes": rank["base_bytes"], "peak_bytes": max(measured.values()), "peak_rss_bytes":
            rank["peak_rss_bytes"], "seconds_per_iteration": sum(seconds) / len(seconds),
            "generate_seconds": rank["generate_seconds"], "sampled_tokens": rank["sampled"],
            "estimate": compared, "worst_estimate_error": max(abs(c["relative_error"]) for c in compared.values())}


def benchmark(args: argparse.Namespace) -> dict:
    directory = args.json.parent / "runs"
    one = launch(args, 1, directory / "one", "--save-every", "0")
    sharded = launch(args, 2, directory / "fsdp2", "--sharding", "fsdp2", "--save-every", "0")
    report = {
        "settings": {"model": args.model, "mode": "hydra", "objective": "ppo", "global_rows": args.rows,
                     "prompt_tokens": args.prompt, "response_tokens": args.response, "iterations": args.iterations,
                     "lora_r": args.lora_r, "quantization": args.quantization, "dtype": args.dtype, "device": "cpu",
                     "backend": "gloo",
                     "omp_threads": os.environ.get("OMP_NUM_THREADS", "1")},
        "one_process": summarize_rank(one["ranks"][0], estimate_per_rank(args, 1, "none")),
        "fsdp2_ranks": [summarize_rank(rank, estimate_per_rank(args, 2, "fsdp2")) for rank in sharded["ranks"]],
        "max_abs_difference": max_difference(one["trained"], sharded["trained"]),
        "frozen_base_unchanged": one["frozen_before"] == sharded["frozen_after"] == sharded["frozen_before"],
    }
    base = report["one_process"]["base_bytes"]
    report["base_ratio_per_rank"] = [rank["base_bytes"] / base for rank in report["fsdp2_ranks"]]
    report["peak_ratio_per_rank"] = [rank["peak_bytes"] / report["one_process"]["peak_bytes"]
                                     for rank in report["fsdp2_ranks"]]
    report["meets_target"] = max(report["base_ratio_per_rank"]) <= TARGET_BASE_RATIO
    return report


def print_report(report: dict) -> None:
    mib = 1 << 20
    rows = [("1 process", report["one_process"])] + [(f"fsdp2 rank {i}", r) for i, r in enumerate(report["fsdp2_ranks"])]
    print(f"{'':14s} {'base MiB':>9s} {'peak MiB':>9s} {'RSS MiB':>8s} {'s/iter':>7s} {'estimate worst':>15s}")
    for name, r in rows:
        print(f"{name:14s} {r['base_bytes'] / mib:9.1f} {r['peak_bytes'] / mib:9.1f} {r['peak_rss_bytes'] / mib:8.0f} "
              f"{r['seconds_per_iteration']:7.2f} {r['worst_estimate_error']:+15.1%}")
    print(f"base per rank / one process: {', '.join(f'{x:.3f}' for x in report['base_ratio_per_rank'])} "
          f"(target <= {TARGET_BASE_RATIO}); max |difference| of the trained weights: "
          f"{report['max_abs_difference']:.2e}; frozen base unchanged: {report['frozen_base_unchanged']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("worker", help="One run (under torchrun for N ranks).")
    run.add_argument("model")
    run.add_argument("output")
    run.add_argument("--sharding", default="none", choices=("none", "fsdp2"))
    run.add_argument("--resume", action="store_true", help="Go on from the newest checkpoint in OUTPUT.")
    run.add_argument("--timeout", type=int, default=60, help="Seconds a rank waits on a collective.")
    run.add_argument("--kill-after", dest="kill_after", type=int, default=0, help="The last rank kills itself "
                     "(SIGKILL) once this iteration's checkpoint is saved (a test of resuming).")
    run.add_argument("--save-every", dest="save_every", type=int, default=1, help="Checkpoint every N iterations "
                     "(0: none; the benchmark measures without: a sharded save gathers the trained weights).")
    for sub in (parser, run):
        sub.add_argument("--rows", type=int, default=4, help="Global batch: sequences per iteration, all ranks.")
        sub.add_argument("--prompt", type=int, default=32, help="Prompt tokens.")
        sub.add_argument("--response", type=int, default=32, help="Response tokens.")
        sub.add_argument("--iterations", type=int, default=3)
        sub.add_argument("--lora-r", dest="lora_r", type=int, default=16)
        sub.add_argument("--quantization", default="none", choices=("none", "4bit"),
                         help="The base: fp32, or 4-bit NF4 through bitsandbytes (QLoRA, sharded alike).")
        sub.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                         help="The base's dtype (bfloat16: a GPU run's mix, with fp32 adapters and heads).")
    parser.add_argument("--model", default="smollm2-135m", help="The bundled model, or a model directory.")
    parser.add_argument("--json", type=Path, default=Path("runs/sharding/sharding.json"))
    args = parser.parse_args()
    if args.command == "worker":
        worker(args)
        return
    report = benchmark(args)
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
