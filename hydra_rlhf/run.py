"""``run_rl``: a whole RL run (load, train, evaluate, report), shared by ``recipes/ppo.py``, the demo and the
notebooks. Writes into ``output_dir``: ``metrics.jsonl``, ``memory.jsonl``, ``checkpoints/``, ``final/`` (the
trained adapters and heads), ``eval.json``, ``training.png``, ``memory.png`` and ``summary.json``."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .config import RLConfig
from .config import HydraModelConfig
from .model.hydra import HydraModel
from .layout import objective_info
from .memory.plan import AUTO_LEVERS, lever_value, plan_memory
from .memory.profiler import stage_table, storage_bytes, wide_console
from .model.sharding import end_process_group, is_distributed, load_device, trained_state

logger = logging.getLogger(__name__)
PLAN_FILE = "memory_plan.json"  # what levers auto chose for the run, and from which budget


def make_accelerator(report_to: str = "none", output_dir: str = "runs"):
    from accelerate import Accelerator

    return Accelerator(
        cpu=not torch.cuda.is_available(),
        log_with=None if report_to == "none" else report_to,
        project_dir=output_dir,
    )


def run_rl(model_config: HydraModelConfig, config: RLConfig, accelerator=None, console=None) -> dict:
    """Train, evaluate on held-out prompts, print the memory table, and return the run's summary."""
    from .checkpoints import record_or_check_run_settings, run_settings, write_atomically
    from .data import load_prompt_rows
    from .evaluate import evaluate, evaluate_rewards
    from .memory.profiler import summarize
    from .model.loading import check_context, load_tokenizer, resolve_model
    from .plots import plot_memory, plot_training
    from .trainer import RLTrainer

    started = time.perf_counter()
    accelerator = accelerator or make_accelerator(config.report_to, config.output_dir)
    console = console or wide_console()
    output = Path(config.output_dir)
    if not config.resume and any((output / name).exists() for name in ("metrics.jsonl", "memory.jsonl", "checkpoints")):
        raise ValueError(f"{output} already holds a run: pass --resume true to continue it, or choose another output_dir.")
    with accelerator.main_process_first():  # the bundled model converts once, on the main process
        resolve_model(model_config.model_name_or_path)
    # everything that can be checked before the weights load: the context, the data, the run's own settings
    check_context(model_config.model_name_or_path, config.max_prompt_length + config.max_new_tokens + 1,
                  "max_prompt_length + max_new_tokens (+1 for the EOS the reward is read at)",
                  model_config.trust_remote_code)
    if config.generation_backend == "vllm":  # a missing extra is one line now, not after the weights load
        from .experience.vllm_engine import import_vllm

        import_vllm()
    prompts = load_prompt_rows(config.prompts_path, config.prompt_column)
    # levers auto: the levers left unset, chosen from the estimate for the memory this process has
    model_config, config, plan = plan_memory(model_config, config, accelerator, console)
    if accelerator.is_main_process:  # the fingerprint reads the bases' files: once, not once per process
        record_or_check_run_settings(output, run_settings(model_config, config), config.resume)
        if plan is not None:
            (output / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2))
    tokenizer = load_tokenizer(model_config.model_name_or_path, model_config.trust_remote_code)
    model = HydraModel.from_config(model_config, device=accelerator.device, seed=config.seed,
                                   critic=objective_info(config.objective).critic, reward_head=config.head_weight > 0,
                                   load_device=load_device(config, accelerator.num_processes, accelerator.device))
    accelerator.init_trackers("hydra-rlhf", config={**asdict(model_config), **asdict(config)})

    trainer = RLTrainer(model, tokenizer, config, prompts, accelerator)
    fingerprint = model.frozen_fingerprint()
    history = trainer.train()
    trainer.profiler.close()
    rank_hashes = trainer.trainable_hashes_across_ranks()
    memory = summarize(trainer.profiler.history)
    trained = trained_state(model)  # a sharded model's trained weights, whole (every rank takes part)
    summary = {
        "objective": config.objective,
        "mode": model_config.mode,
        "device": str(accelerator.device),
        "measure": trainer.profiler.measure,
        "iterations": trainer.iteration,
        "base_copies": model.base_copies(),
        "sharding": trainer.sharding,
        "processes": trainer.world,
        "base_bytes_per_rank": storage_bytes(model.base_parameters()),
        "frozen_base_unchanged": fingerprint == model.frozen_fingerprint(),
        "trainable_hash_per_rank": rank_hashes,
        "memory": memory,
        "memory_plan": plan.to_dict() if plan else None,
        "levers": {lever: lever_value(model_config, config, lever) for lever in AUTO_LEVERS},
        "peak_bytes": max((s["peak_bytes"] for s in memory.values()), default=0),
        "final_metrics": history[-1] if history else {},
    }
    if accelerator.is_main_process:  # a kill while writing never leaves a mix
        write_atomically(output / "final", lambda staging: model.save_pretrained(staging, trained))
    # a distributed model evaluates on every rank (generate steps all ranks together); the main one reports
    if accelerator.is_main_process or is_distributed(model):
        if config.eval_prompts_path:
            eval_rows = load_prompt_rows(config.eval_prompts_path, config.prompt_column, config.num_eval_prompts)
            max_new_tokens = config.eval_max_new_tokens or config.max_new_tokens
            scorer = trainer.experience.scorer
            if scorer is not None:  # the run's own reward sources, on held-out rows (their columns too)
                results = evaluate_rewards(model, tokenizer, eval_rows, scorer.for_rows(eval_rows), max_new_tokens,
                                           config.max_prompt_length)
            else:  # the demo's judge: gold score, win-rate, distinct-2, the reward head
                results = evaluate(model, tokenizer, eval_rows.prompts, max_new_tokens, config.max_prompt_length)
            summary["eval"] = results
    if accelerator.is_main_process:
        if config.eval_prompts_path:
            (output / "eval.json").write_text(json.dumps(summary["eval"], indent=2))
        history = _read_history(output / "metrics.jsonl") or history  # a resumed run plots the whole run
        if history:
            plot_training(history, output / "training.png")
        if memory:
            plot_memory({model_config.mode: memory}, output / "memory.png")
            console.print(stage_table({model_config.mode: memory}))
            console.print(f"measure: {summary['measure']}")
        summary["wall_seconds"] = time.perf_counter() - started
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    end_process_group(accelerator)  # last: it ends the process group the gathers above use
    return summary


def _read_history(path: Path) -> list[dict]:
    """metrics.jsonl, one row per iteration (a resumed run re-logs iterations after its checkpoint: keep the last)."""
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["iteration"]] = row
    return [rows[i] for i in sorted(rows)]
