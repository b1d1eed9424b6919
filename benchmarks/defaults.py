"""The least memory each system trains in, and its time: our GRPO and PPO arithmetic recipes against TRL's
GRPOTrainer on the same task, samples, lengths and LoRA (issue #35).

    python benchmarks/defaults.py --json runs/defaults/defaults.json
    python benchmarks/defaults.py --only trl-function-frugal,ours-grpo-levers --iterations 4

The task is ``recipes/configs/grpo_arithmetic.yaml``'s at the shape it had when these figures were measured (our
runs pin it by flags, ``OUR_SHAPE``): the bundled SmolLM2-135M in fp32 on the CPU, the bundled ``arithmetic:train``
prompts, 4 prompts x 4 samples = 16 responses per iteration, 48 new tokens at temperature 0.7,
LoRA r16 alpha 32 on the top 12 layers, 2 passes over each batch in minibatches of 8, KL weight 0.05 against the
adapters-off reference. TRL runs it as ``GRPOTrainer`` (``num_generations=4``, ``generation_batch_size=16``,
``num_iterations=2``, ``beta=0.05``, peft ``layers_to_transform``), rewarded either by our ``accuracy`` and
``format`` functions (TRL's signature) or by a reward model (``AutoModelForSequenceClassification`` with one label
built from the bundled directory: a second base, as a TRL user with a learned reward model has; its score head is
random, which changes no memory). Each system runs at its defaults and at its most frugal settings:

* TRL: defaults (gradient checkpointing on, micro-batch 8) and frugal (gradient checkpointing, micro-batch
  ``--trl_micro_batch`` with gradient accumulation up to the same 8 samples per optimizer step);
* ours: the recipe as shipped, with the levers by hand (``--gradient_checkpointing true --logprob_chunk_size 64
  --gradient_accumulation_steps 4``), and, where the run plans its own levers (``--levers auto``), a sweep of
  ``--memory_budget`` from generous to the tightest that fits (a budget nothing fits exits 2 with ``error:``).

Every run is its own subprocess, one at a time, in the order listed (ours and TRL interleaved). Peak RSS is the
largest of the child's VmRSS polled from here every few milliseconds, the kernel's maxrss at its exit (``wait4``)
and, for ours, the per-stage VmHWM its profiler records: the profiler resets VmHWM at every stage start (to give
each stage its own), so the exit figure alone would miss the peaks before the last reset. Seconds per iteration:
the median of iterations 2..N (ours: ``speed/iteration_seconds`` in metrics.jsonl, measured with the profiler's
tensor accounting on, as the recipes run; TRL: the time between every 4th optimizer step, one generation's
worth). Our profiler's tensor peak per stage comes from summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra_rlhf.experiments import ROOT, write_json

GIB = 1 << 30
MODEL = "smollm2-135m"
GRPO_CONFIG = "recipes/configs/grpo_arithmetic.yaml"
PPO_CONFIG = "recipes/configs/ppo_arithmetic.yaml"
# The shape these figures were measured at (grpo_arithmetic.yaml as it was then), which the TRL runs copy. Our runs
# pin it by flags (OUR_SHAPE), so the comparison holds however the recipes' budget and rewards are tuned later.
PROMPTS, SAMPLES, MINIBATCH, PASSES = 4, 4, 8, 2
MAX_NEW_TOKENS, TEMPERATURE, KL_COEF, LEARNING_RATE = 48, 0.7, 0.05, 4.0e-4
FUNCTION_REWARDS = {"accuracy": 1.0, "format": 0.1}  # built-in name -> weight, for both systems' function reward
OUR_SHAPE_COMMON = ["--num_epochs", str(PASSES), "--actor_lr", str(LEARNING_RATE), "--reward_funcs", *FUNCTION_REWARDS,
                    "--reward_weights", *map(str, FUNCTION_REWARDS.values())]
OUR_SHAPE = {GRPO_CONFIG: ["--batch_size", str(PROMPTS), "--num_samples_per_prompt", str(SAMPLES), *OUR_SHAPE_COMMON],
             PPO_CONFIG: ["--batch_size", str(PROMPTS * SAMPLES), *OUR_SHAPE_COMMON]}
LORA_R, LORA_ALPHA, LORA_LAYERS = 16, 32, 12
# A Llama decoder layer's linear layers: ours names them itself when LoRA sits on the top layers only (peft wants
# names with layers_to_transform).
LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPTIMIZER_STEPS_PER_ITERATION = PASSES * PROMPTS * SAMPLES // MINIBATCH  # 4: what one of our iterations does
# A candidate cut outside the code: glibc's mmap threshold fixed at 4 MiB (it otherwise rises to 32 MiB as large
# tensors come and go, and freed blocks under it stay in the heap, fragmented): the 25 MB log-prob chunks are mapped
# and unmapped whole, while generation's small key-value cache steps stay on the heap.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(4 << 20), "MALLOC_TRIM_THRESHOLD_": str(8 << 20)}
BY_HAND = ["--gradient_checkpointing", "true", "--logprob_chunk_size", "64", "--gradient_accumulation_steps", "4"]
# The budget sweeps, generous first: each budget where levers auto's plan changes on this task (``hydra-rlhf
# estimate --memory-budget``), down to one that fits nothing (refused before the weights load).
DEFAULT_BUDGETS = {"grpo": "4GiB,1.25GiB,800MiB,700MiB", "ppo": "4GiB,1GiB,800MiB,700MiB"}
# The targets: our tightest peak RSS against TRL's most frugal, by TRL's reward source.
TARGETS = {"function": 0.8, "reward_model": 0.6}


# ------------------------------------------------------------------------------------------- the measurements


@dataclass
class Child:
    """A finished subprocess: its exit status, wall seconds, output tail and the peak RSS seen."""

    returncode: int
    seconds: float
    output: str
    polled_peak_bytes: int
    exit_maxrss_bytes: int
    extra_peaks: list[int] = field(default_factory=list)  # peaks the child recorded itself (our per-stage VmHWM)

    @property
    def peak_rss_bytes(self) -> int:
        return max([self.polled_peak_bytes, self.exit_maxrss_bytes, *self.extra_peaks])


def vm_rss_bytes(pid: int) -> int:
    """A process's current resident set (VmRSS), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(args: list[str], threads: int, poll_seconds: float = 0.005, env: dict | None = None) -> Child:
    """``python *args`` in the checkout, its RSS polled until it exits; the kernel's maxrss from ``wait4``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    peak, done = [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], vm_rss_bytes(process.pid))
            time.sleep(poll_seconds)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    output = process.stdout.read()  # until the child closes it (at exit)
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    poller.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    return Child(process.returncode, time.perf_counter() - started, output[-4000:], peak[0], usage.ru_maxrss * 1024)


def median_after_first(values: list[float]) -> float | None:
    """The median of iterations 2..N (the first pays for warm-up); the lone value when there is one."""
    rest = values[1:] or values
    return statistics.median(rest) if rest else None


def ratio(ours: int | None, theirs: int | None) -> float | None:
    return round(ours / theirs, 3) if ours and theirs else None


def gib(n: int | None) -> str:
    return f"{n / GIB:.2f} GiB" if n else "-"


# ------------------------------------------------------------------------------------------------------- TRL


def trl_settings(reward: str, frugal: bool, micro_batch: int) -> dict:
    """One TRL run's settings: its reward source, and micro-batch / accumulation (the optimizer sees 8 either way)."""
    micro = micro_batch if frugal else MINIBATCH
    return {"reward": reward, "gradient_checkpointing": True, "per_device_train_batch_size": micro,
            "gradient_accumulation_steps": MINIBATCH // micro}


def trl_worker(settings: dict, iterations: int, output_dir: Path, result_path: Path) -> None:
    """Run TRL's GRPOTrainer for ``iterations`` generations' worth of steps in this process; write the step times."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from hydra_rlhf.data import load_prompt_rows
    from hydra_rlhf.model.loading import resolve_model
    from hydra_rlhf.rewards.builtins import BUILTINS

    torch.manual_seed(0)
    path = resolve_model(MODEL)
    rows = load_prompt_rows("arithmetic:train")
    dataset = Dataset.from_dict({"prompt": rows.prompts, "answer": rows.columns["answer"]})
    if settings["reward"] == "function":
        reward_funcs, reward_weights = [BUILTINS[name] for name in FUNCTION_REWARDS], list(FUNCTION_REWARDS.values())
    else:  # as TRL loads a reward model named by path: a second base, here with a random score head
        reward_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        reward_funcs, reward_weights = [reward_model], None
    num_layers = json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=LINEAR_LAYERS, layers_to_transform=list(range(num_layers - LORA_LAYERS, num_layers)),
                      layers_pattern="layers")
    args = GRPOConfig(
        output_dir=str(output_dir), use_cpu=True, bf16=False, fp16=False, seed=0, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True,
        max_steps=iterations * OPTIMIZER_STEPS_PER_ITERATION, learning_rate=LEARNING_RATE,
        num_generations=SAMPLES, generation_batch_size=PROMPTS * SAMPLES, num_iterations=PASSES,
        per_device_train_batch_size=settings["per_device_train_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        max_completion_length=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=KL_COEF,
        reward_weights=reward_weights,
    )
    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    started = time.perf_counter()
    # Loaded here, as TRL would from the path (the bundled config names no architecture, which TRL's loader needs).
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, peft_config=lora,
                          callbacks=[StepTimes()])
    loaded = time.perf_counter()
    trainer.train()
    ends = [loaded] + step_ends[OPTIMIZER_STEPS_PER_ITERATION - 1 :: OPTIMIZER_STEPS_PER_ITERATION]
    result = {"settings": settings, "load_seconds": loaded - started,
              "iteration_seconds": [b - a for a, b in zip(ends, ends[1:])], "steps": len(step_ends),
              "vm_hwm_bytes": _own_status("VmHWM")}
    result_path.write_text(json.dumps(result, indent=2))


def _own_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run_trl(name: str, settings: dict, iterations: int, work: Path, threads: int) -> dict:
    directory = work / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    result_path = directory / "result.json"
    child = run_measured([str(Path(__file__).resolve()), "--trl_worker", json.dumps(settings),
                          "--iterations", str(iterations), "--output_dir", str(directory),
                          "--worker_result", str(result_path)], threads)
    if child.returncode != 0:
        return {"system": "trl", "settings": settings, "error": child.output[-2000:]}
    result = json.loads(result_path.read_text())
    return {"system": "trl", "settings": settings, "peak_rss_bytes": child.peak_rss_bytes,
            "seconds_per_iteration": median_after_first(result["iteration_seconds"]),
            "iteration_seconds": result["iteration_seconds"], "load_seconds": result["load_seconds"],
            "wall_seconds": child.seconds}


# ------------------------------------------------------------------------------------------------------- ours


def levers_auto_available() -> bool:
    """Whether the recipes take ``--levers`` and ``--memory_budget`` (issue #35's planner) in this checkout."""
    import dataclasses

    from hydra_rlhf.config import RLConfig

    names = {f.name for f in dataclasses.fields(RLConfig)}
    return {"levers", "memory_budget"} <= names


def run_ours(name: str, config: str, flags: list[str], iterations: int, work: Path, threads: int,
             env: dict | None = None) -> dict:
    """One recipe run: peak RSS, s/iteration, the profiler's stages, and the memory plan where it made one."""
    directory = work / name
    shutil.rmtree(directory, ignore_errors=True)
    child = run_measured(["recipes/ppo.py", "--config", config, "--output_dir", str(directory), "--max_iterations",
                          str(iterations), "--eval_prompts_path", "", "--save_every", "0", *OUR_SHAPE[config], *flags],
                         threads, env=env)
    run = {"system": "ours", "config": config, "flags": flags, **({"env": env} if env else {})}
    if child.returncode != 0:
        error = [line for line in child.output.splitlines() if line.startswith("error:")]
        return {**run, "returncode": child.returncode, "error": (error or [child.output[-2000:]])[-1]}
    summary = json.loads((directory / "summary.json").read_text())
    metrics = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in (directory / "memory.jsonl").read_text().splitlines() if line.strip()]
    stage_rss = [stage.get("rss_peak_bytes") or 0 for record in records for stage in record["stages"].values()]
    child.extra_peaks = stage_rss
    plan = summary.get("memory_plan")
    run.update({
        "peak_rss_bytes": child.peak_rss_bytes,
        "peak_rss_sources": {"polled": child.polled_peak_bytes, "exit_maxrss": child.exit_maxrss_bytes,
                             "stage_vmhwm": max(stage_rss, default=0)},
        "seconds_per_iteration": median_after_first([m["speed/iteration_seconds"] for m in metrics]),
        "iteration_seconds": [m["speed/iteration_seconds"] for m in metrics],
        "peak_tensor_bytes": summary.get("peak_bytes"),
        "stages": {name: {"peak_bytes": stage.get("peak_bytes"), "rss_peak_bytes": max(
                   (r["stages"].get(name, {}).get("rss_peak_bytes") or 0 for r in records), default=0)}
                   for name, stage in summary.get("memory", {}).items()},
        "wall_seconds": child.seconds,
    })
    if plan:
        run["memory_plan"] = plan
        run.update(check_plan(plan, summary.get("peak_bytes")))
    return run


def check_plan(plan: dict, peak_tensor_bytes: int | None) -> dict:
    """The plan's promises against the profile: the tensor peak never over the budget, within 10% of the estimate."""
    budget, estimate = plan.get("budget_bytes"), plan.get("estimate_bytes")
    checks = {}
    if budget and peak_tensor_bytes:
        checks["peak_over_budget"] = peak_tensor_bytes > budget
    if estimate and peak_tensor_bytes:
        checks["estimate_error"] = round(estimate / peak_tensor_bytes - 1, 4)
        checks["estimate_within_10pct"] = abs(checks["estimate_error"]) <= 0.10
    return checks


def sweep_budgets(name: str, config: str, budgets: list[str], iterations: int, work: Path, threads: int) -> dict:
    """``--levers auto`` at each budget, generous first, until one that fits nothing (exit 2): the last run that
    trained is the tightest."""
    runs = {}
    for budget in budgets:
        run = run_ours(f"{name}-{budget}", config, ["--levers", "auto", "--memory_budget", budget], iterations, work,
                       threads)
        run["budget"] = budget
        runs[budget] = run
        report(f"{name} @ {budget}", run)
        if "error" in run:
            break
    return runs


# ---------------------------------------------------------------------------------------------------- the plan


def planned_runs(args, auto: bool) -> list[tuple[str, callable]]:
    """(name, thunk) in the order they run: TRL and ours interleaved, so drift on a shared machine hits both."""
    work, n, threads = args.output_dir, args.iterations, args.threads
    trl = lambda name, reward, frugal: (name, lambda: run_trl(  # noqa: E731
        name, trl_settings(reward, frugal, args.trl_micro_batch), n, work, threads))
    ours = lambda name, config, flags, env=None: (name, lambda: run_ours(  # noqa: E731
        name, config, flags, n, work, threads, env))
    off = ["--levers", "off"] if auto else []
    runs = [
        trl("trl-function-frugal", "function", True),
        ours("ours-grpo-levers", GRPO_CONFIG, [*off, *BY_HAND]),
        ours("ours-grpo-levers-mmap4m", GRPO_CONFIG, [*off, *BY_HAND], FIXED_MMAP_THRESHOLD),
        trl("trl-reward_model-frugal", "reward_model", True),
        ours("ours-grpo-default", GRPO_CONFIG, off),
        trl("trl-function-default", "function", False),
        ours("ours-ppo-levers", PPO_CONFIG, [*off, *BY_HAND]),
        trl("trl-reward_model-default", "reward_model", False),
        ours("ours-ppo-default", PPO_CONFIG, off),
    ]
    if auto:  # after the TRL frugal runs and our levers by hand, before the defaults
        sweeps = [(f"ours-{kind}-auto", lambda kind=kind, config=config: sweep_budgets(
            f"ours-{kind}-auto", config, getattr(args, f"{kind}_budgets").split(","), n, work, threads))
            for kind, config in (("grpo", GRPO_CONFIG), ("ppo", PPO_CONFIG))]
        runs = runs[:4] + sweeps + runs[4:]
    return runs


def report(name: str, run: dict) -> None:
    if "error" in run:
        last = (run["error"].strip().splitlines() or ["?"])[-1]
        print(f"{name:32s} {last if last.startswith('error:') else 'error: ' + last}", flush=True)
        return
    seconds = run.get("seconds_per_iteration")
    line = f"{name:32s} peak RSS {gib(run.get('peak_rss_bytes')):>10s}  {seconds or 0:6.1f} s/iteration"
    if run.get("peak_tensor_bytes"):
        line += f"  tensor peak {gib(run['peak_tensor_bytes'])}"
    if run.get("memory_plan"):
        line += f"  plan: {run['memory_plan'].get('line', '')}"
    print(line, flush=True)


def tightest(runs: dict) -> dict | None:
    """Our run with the smallest peak RSS among those that trained (sweeps included), as the code runs: a run under a
    changed environment (the allocator candidate) is reported beside it, not counted."""
    candidates = []
    for name, run in runs.items():
        if name.startswith("ours-") and name.endswith("-auto"):
            candidates += [r for r in run.values() if "peak_rss_bytes" in r]
        elif name.startswith("ours-grpo") and "peak_rss_bytes" in run and not run.get("env"):
            candidates.append(run)
    return min(candidates, key=lambda r: r["peak_rss_bytes"], default=None)


def comparisons(runs: dict) -> dict:
    """Our tightest GRPO peak against TRL's most frugal, per TRL reward source, with the issue's targets."""
    ours = tightest({k: v for k, v in runs.items() if "ppo" not in k})
    out = {}
    for reward, target in TARGETS.items():
        trl = runs.get(f"trl-{reward}-frugal", {})
        value = ratio(ours and ours.get("peak_rss_bytes"), trl.get("peak_rss_bytes"))
        out[reward] = {"ours_peak_rss_bytes": ours and ours.get("peak_rss_bytes"),
                       "trl_peak_rss_bytes": trl.get("peak_rss_bytes"), "ratio": value, "target": target,
                       "met": value is not None and value <= target}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=5, help="Iterations per run (s/iteration: median of 2..N).")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run (one run at a time).")
    parser.add_argument("--trl_micro_batch", type=int, default=1, help="TRL's frugal per-device micro-batch; "
                        "accumulation makes up the 8 samples of an optimizer step.")
    for kind, budgets in DEFAULT_BUDGETS.items():
        parser.add_argument(f"--{kind}_budgets", default=budgets, help=f"levers auto: the {kind} recipe's memory_budget "
                            "sweep, generous first (it stops at the first budget that fits nothing).")
    parser.add_argument("--only", help="Comma-separated run names (see the list printed with --list).")
    parser.add_argument("--list", action="store_true", help="Print the run names and exit.")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/defaults"))
    parser.add_argument("--json", type=Path, help="Write the results here.")
    parser.add_argument("--resume", action="store_true", help="Keep the runs already in --json and run the rest "
                        "(the comparisons cover both).")
    parser.add_argument("--trl_worker", help=argparse.SUPPRESS)  # internal: one TRL run's settings, in a subprocess
    parser.add_argument("--worker_result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker), args.iterations, args.output_dir, args.worker_result)
        return 0

    auto = levers_auto_available()
    runs = planned_runs(args, auto)
    if args.list:
        print("\n".join(name for name, _ in runs))
        return 0
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {name for name, _ in runs}
        if unknown:
            parser.error(f"unknown run(s) {', '.join(sorted(unknown))}; --list names them")
        runs = [(name, thunk) for name, thunk in runs if name in wanted]
    args.output_dir = args.output_dir.resolve()
    print(f"{len(runs)} runs, {args.iterations} iterations each, OMP_NUM_THREADS={args.threads}; levers auto "
          f"{'available' if auto else 'not in this checkout: levers by hand'}", flush=True)
    results = json.loads(args.json.read_text())["runs"] if args.resume and args.json and args.json.is_file() else {}
    for name, thunk in runs:
        if name in results:
            continue
        results[name] = thunk()
        write_json(args.json, {"runs": results})  # each run kept as it finishes: a later --resume starts after it
        if not name.endswith("-auto"):
            report(name, results[name])
    compared = comparisons(results)
    for reward, row in compared.items():
        if row["ratio"] is not None:
            print(f"ours tightest / TRL frugal ({reward}): {row['ratio']:.2f}x (target <= {row['target']}: "
                  f"{'met' if row['met'] else 'not met'})")
    write_json(args.json, {"settings": {"iterations": args.iterations, "threads": args.threads,
                                        "trl_micro_batch": args.trl_micro_batch, "levers_auto": auto},
                           "runs": results, "comparisons": compared})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
