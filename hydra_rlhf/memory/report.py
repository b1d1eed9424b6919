"""``hydra-rlhf estimate``: the per-stage peak memory of one iteration, predicted from a model's config alone (no
weights, no torch), and which cards it fits.

    hydra-rlhf estimate --preset llama-3.1-8b --quant 4bit --batch-size 8 --gradient-checkpointing

The run-shape flags are the recipes' keys (``memory/arguments.py``); ``--batch-size`` counts prompts. The
formulas are in ``memory/formulas.py``, the model and run shapes and the cards in ``memory/shape.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from ..config import parse_bytes
from ..layout import MODES, OBJECTIVES, SHARDINGS
from .arguments import add_budget_arguments, add_run_shape_arguments, set_levers, settings_from_args
from .formulas import CATEGORIES, Estimate, estimate
from .plan import Plan, plan_levers
from .shape import CUDA_RESERVED_BYTES, DEVICES, GPUS, EstimateSettings, GiB, ModelShape, find_gpu, load_preset, \
    presets, shape_from_hub

# ----------------------------------------------------------------------------------------------- the cards


def batch_step(settings: EstimateSettings) -> int:
    """The fewest prompts a batch of these settings may hold: its rows must tile a fixed ``minibatch_size`` and
    ``gradient_accumulation_steps`` (``layout.check_batch``); the valid batches are the multiples of it."""
    for prompts in range(1, settings.batch_size):
        try:
            replace(settings, batch_size=prompts)
            return prompts
        except ValueError:
            continue
    return settings.batch_size  # valid, as the settings exist


def largest_batch(shape: ModelShape, settings: EstimateSettings, budget_bytes: int, limit: int = 1 << 16) -> int:
    """The largest batch_size (prompts) whose peak fits ``budget_bytes`` (0 if none does). The peak never falls
    as the batch grows, so double then bisect, over multiples of ``batch_step``; a fixed ``minibatch_size`` and
    the samples per prompt stay fixed."""
    step = batch_step(settings)

    def fits(units: int) -> bool:
        return estimate(shape, replace(settings, batch_size=units * step)).peak_bytes <= budget_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high * step <= limit and fits(high):
        low, high = high, 2 * high
    if high * step > limit:
        return low * step
    while high - low > 1:  # fits(low) and not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * step


def gpu_table(shape: ModelShape, settings: EstimateSettings, gpus=GPUS) -> list[dict]:
    """For each card: does this setting fit, with how much headroom, and the largest batch that would."""
    peak = estimate(shape, settings).peak_bytes
    return [{"name": gpu.name, "usable_bytes": gpu.usable_bytes, "fits": peak <= gpu.usable_bytes,
             "headroom_bytes": gpu.usable_bytes - peak,
             "largest_batch": largest_batch(shape, settings, gpu.usable_bytes)}
            for gpu in gpus]


# ------------------------------------------------------------------------------------------------------ CLI


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``hydra-rlhf estimate``: the model, the run shape (defaults: ``EstimateSettings``'), output."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help=f"A bundled model shape: {', '.join(presets())} (default llama-3.1-8b).")
    source.add_argument("--config", help="A config.json, a model directory, or a hub id (needs the network).")
    parser.add_argument("--mode", default="hydra", choices=[*MODES, "all"], help="Model layout, or all four.")
    parser.add_argument("--objective", default="ppo", choices=[*OBJECTIVES, "all"],
                        help="What is trained: ppo builds a critic, rloo/grpo/online_dpo do not; all: one column each "
                        "(each at its own k unless --num-samples-per-prompt is given).")
    add_run_shape_arguments(parser, EstimateSettings)
    add_budget_arguments(parser)
    parser.add_argument("--device", default="cuda", choices=DEVICES, help="Where it would run.")
    parser.add_argument("--gpus", type=int, default=1, help="Processes, one card each (figures are per rank; "
                        "--batch-size stays per process).")
    parser.add_argument("--sharding", default="none", choices=SHARDINGS, help="fsdp2: each rank holds 1/--gpus of "
                        "the base, adapters and optimizer state (docs/sharding.md); none: a replica on each.")
    parser.add_argument("--padded-prompts", action=argparse.BooleanOptionalAction, default=True,
                        help="Prompts of unequal length (an attention mask); --no-padded-prompts: all equally long.")
    parser.add_argument("--json", type=Path, help="Write the estimate here.")


def run_estimate(args: argparse.Namespace) -> int:
    """Print the per-stage, breakdown and GPU tables; write ``--json``. Bad input: one line, exit status 2."""
    try:
        if args.mode == "all" and args.objective == "all":
            raise ValueError("--mode all and --objective all together: compare one of them at a time")
        shape = model_shape_from_args(args)
        modes = list(MODES) if args.mode == "all" else [args.mode]
        objectives = list(OBJECTIVES) if args.objective == "all" else [args.objective]
        skipped = [m for m in modes if m == "full" and args.quantization != "none" and args.mode == "all"]
        columns = {  # one column per mode, or per objective
            (objective if args.objective == "all" else mode):
                settings_from_args(EstimateSettings, args, mode=mode, objective=objective)
            for mode in modes if mode not in skipped for objective in objectives
        }
        plans = {label: plan_for_args(shape, settings, args) for label, settings in columns.items()}
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    estimates = {label: estimate(shape, replace(settings, **plans[label].levers) if plans[label] else settings)
                 for label, settings in columns.items()}
    gpus = {label: gpu_table(shape, est.settings) for label, est in estimates.items()}
    _print_report(shape, estimates, gpus, skipped)
    for label, plan in plans.items():
        if plan is not None:
            print(f"{label}: {plan.line()}")
    if args.json:
        group = "objectives" if args.objective == "all" else "modes" if args.mode == "all" else None
        _write_json(args.json, shape, estimates, gpus, group, plans)
    return 0


def plan_for_args(shape: ModelShape, settings: EstimateSettings, args: argparse.Namespace) -> Plan | None:
    """The plan levers auto would make for ``--memory-budget`` or ``--gpu`` (None without either); levers given
    as flags stay as given."""
    if args.gpu:
        card = find_gpu(args.gpu)
        return plan_levers(shape, settings, card.usable_bytes, set_levers(args), f"{card.name}, usable")
    if args.memory_budget:
        return plan_levers(shape, settings, parse_bytes(args.memory_budget), set_levers(args))
    return None


def model_shape_from_args(args: argparse.Namespace) -> ModelShape:
    if args.config is None:
        return load_preset(args.preset or "llama-3.1-8b")
    path = Path(args.config).expanduser()
    if path.exists() or args.config.endswith(".json") or "/" not in args.config.strip("/"):
        return ModelShape.from_config(path, name=path.parent.name if path.name == "config.json" else path.stem)
    return shape_from_hub(args.config)


def _write_json(path: Path, shape: ModelShape, estimates: dict, gpus: dict, group: str | None, plans: dict) -> None:
    """A single estimate: its keys at the top level. ``--mode all`` / ``--objective all``: one entry per column
    under "modes" / "objectives". With a budget, each entry's "plan" is what levers auto would choose."""
    entries = {label: est.to_dict() | {"gpus": gpus[label]} | ({"plan": plans[label].to_dict()} if plans[label] else {})
               for label, est in estimates.items()}
    data = next(iter(entries.values())) if group is None else {"model": asdict(shape), group: entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- printing


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _print_report(shape: ModelShape, estimates: dict, gpus: dict, skipped: list) -> None:
    from rich.console import Console

    console = Console(width=120)
    first = next(iter(estimates.values())).settings
    console.print(f"[bold]{shape.name}[/bold]: {shape.num_params / 1e9:.2f}B parameters, {shape.num_layers} layers, "
                  f"hidden {shape.hidden_size}, vocab {shape.vocab_size}. "
                  f"{describe(first, objective=len({e.settings.objective for e in estimates.values()}) == 1)}")
    for mode in skipped:
        console.print(f"[yellow]{mode}: skipped, it trains every weight and cannot use a {first.quantization} base."
                      "[/yellow]")
    console.print(_stage_table(estimates))
    console.print(_breakdown_table(estimates))
    console.print(_gpu_table(estimates, gpus))
    for mode, est in estimates.items():
        console.print(_verdict(mode, est, gpus[mode]))


def describe(s: EstimateSettings, objective: bool = True) -> str:
    """The settings in one sentence, in the recipes' words."""
    checkpointing = "on" if s.gradient_checkpointing else "off"
    return (f"{f'Objective {s.objective}, b' if objective else 'B'}atch {s.batch_size} prompts x "
            f"{s.samples_per_prompt} = {s.sequences} sequences (micro-batch {s.micro_batch}), "
            f"prompt {s.max_prompt_length} + {s.max_new_tokens} new tokens, {s.compute_dtype}, "
            f"quantization {s.quantization}, LoRA r={s.lora_r}, gradient checkpointing {checkpointing}, {s.device}"
            f"{f' x {s.gpus} processes, sharding {s.sharding} (per rank)' if s.gpus > 1 else ''}. "
            f"Levers: {_describe_levers(s)}.")


def _describe_levers(s: EstimateSettings) -> str:
    on = [f"log-prob chunks of {s.logprob_chunk_size}" if s.logprob_chunk_size else "",
          "8-bit AdamW" if s.optim == "adamw_bnb_8bit" else "",
          ("activation offload" + ("" if s.offload else " (no effect on cpu)")) if s.activation_offload else "",
          f"{s.compute_dtype} adapters" if s.adapter_dtype == "compute" else "",
          f"vllm engine{' in sleep mode' if s.vllm_sleep_mode else ''}" if s.generation_backend == "vllm" else "",
          f"an external reward model ({s.reward_model_quantization}, the base's shape)"
          if s.reward_model_name_or_path else ""]
    return ", ".join(filter(None, on)) or "none"


def _stage_table(estimates: dict):
    from rich.table import Table

    table = Table(title="Peak memory per stage (live tensors)")
    table.add_column("stage")
    for mode in estimates:
        table.add_column(mode, justify="right")
    stages = list(dict.fromkeys(stage for est in estimates.values() for stage in est.stages))
    for stage in stages:
        cells = []
        for est in estimates.values():
            if stage not in est.stages:
                cells.append("-")
                continue
            text = gib(est.stages[stage])
            cells.append(f"[bold]{text} <- peak[/bold]" if stage == est.peak_stage else text)
        table.add_row(stage, *cells)
    return table


def _breakdown_table(estimates: dict):
    from rich.table import Table

    table = Table(title="At the peak stage, by category")
    table.add_column("category")
    for mode, est in estimates.items():
        table.add_column(f"{mode} ({est.peak_stage})", justify="right")
    for category in CATEGORIES:
        if category == "engine" and not any(est.breakdown[category] for est in estimates.values()):
            continue  # no engine beside the learner: no row for it
        table.add_row(category.replace("_", " + ") if category == "adapters_heads" else category,
                      *[gib(est.breakdown[category]) for est in estimates.values()])
    table.add_row("[bold]total[/bold]", *[f"[bold]{gib(est.peak_bytes)}[/bold]" for est in estimates.values()])
    return table


def _gpu_table(estimates: dict, gpus: dict):
    from rich.table import Table

    table = Table(title=f"GPU fit (usable = nvidia-smi total - {CUDA_RESERVED_BYTES / GiB:.0f} GiB reserve; "
                        "largest batch in prompts)")
    table.add_column("GPU")
    table.add_column("usable", justify="right")
    for mode in estimates:
        table.add_column(f"{mode}\nfits / largest batch", justify="right")
    for row, gpu in enumerate(GPUS):
        cells = [f"{'yes' if gpus[m][row]['fits'] else 'no'} / {gpus[m][row]['largest_batch']}" for m in estimates]
        table.add_row(gpu.name, gib(gpu.usable_bytes), *cells)
    return table


def _verdict(mode: str, est: Estimate, rows: list[dict]) -> str:
    """One line: the peak, where it comes from, and, if no card holds it, by how much the largest misses."""
    share = est.breakdown[est.dominant_category] / est.peak_bytes
    line = (f"{mode}: peak {gib(est.peak_bytes)} in '{est.peak_stage}', dominated by {est.dominant_category} "
            f"({share:.0%}).")
    if est.host_bytes:
        line += f" Activation offload holds {gib(est.host_bytes)} of pinned host memory (check the machine's RAM)."
    if not any(row["fits"] for row in rows):
        biggest = max(rows, key=lambda row: row["usable_bytes"])
        line += (f" [red]Fits none of the listed GPUs: {gib(-biggest['headroom_bytes'])} over the largest "
                 f"({biggest['name']}, {gib(biggest['usable_bytes'])} usable).[/red]")
    return line
