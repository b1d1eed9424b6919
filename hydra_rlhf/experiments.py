"""What the benchmark scripts share: running the SFT and RL recipes as subprocesses, reusing their outputs, and
the flags and JSON output common to the benchmarks (``benchmarks/objectives.py``, ``seeds.py``, ``async_rlhf.py``,
``vllm_engine.py``).

The recipes (``recipes/sft.py``, ``recipes/ppo.py``) and their configs live in the checkout beside this package,
not in it: these helpers serve the benchmarks, which run from a checkout with the package installed editable.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The checkout: the recipes run from here, so the default config paths (``recipes/configs/...``) resolve
# wherever the benchmark was started.
ROOT = Path(__file__).resolve().parents[1]

# The comparisons at an equal budget: 11 iterations of 16 responses each, whatever KL a run reaches (the PPO
# recipe's own stop_at_kl would end some runs sooner than others).
EQUAL_BUDGET = ["--max_iterations", "11", "--stop_at_kl", "None"]


def run_script(args: list[str]) -> None:
    """``python *args`` in the checkout; a failure ends the benchmark with the script's last error lines."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def ensure_sft(sft_dir: Path, sft_config: str, overrides: list[str], objective: str = "hydra") -> None:
    """An SFT checkpoint in ``sft_dir`` (objective hydra: policy and reward head in one; sft or reward: the
    baselines' two models), made by ``recipes/sft.py`` unless one is there already."""
    if (sft_dir / "sft_summary.json").is_file():
        return
    print(f"SFT ({objective}) into {sft_dir} ...", flush=True)
    run_script(["recipes/sft.py", "--config", sft_config, "--output_dir", str(sft_dir), "--sft_objective", objective,
                *overrides])


def run_rl_recipe(output: Path, config: str, flags: list[str], reuse: bool) -> tuple[dict, float]:
    """``recipes/ppo.py --config config --output_dir output *flags``: its summary.json and wall seconds. With
    ``reuse``, a finished run in ``output`` is read instead (its own wall time)."""
    if reuse and (output / "summary.json").is_file():  # a finished run of the same config: read, not rerun
        summary = json.loads((output / "summary.json").read_text())
        return summary, summary["wall_seconds"]
    shutil.rmtree(output, ignore_errors=True)  # the recipe appends to the logs of an existing run
    started = time.perf_counter()
    run_script(["recipes/ppo.py", "--config", config, "--output_dir", str(output), *flags])
    return json.loads((output / "summary.json").read_text()), time.perf_counter() - started


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


def as_flags(settings: list[str]) -> list[str]:
    """["key=value", ...] -> ["--key", "value", ...]"""
    flags = []
    for item in settings:
        key, _, value = item.partition("=")
        flags += [f"--{key}", value]
    return flags


def write_json(path: Path | None, results: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(f"json: {path}")


def cuda_available() -> bool:
    import torch  # here, not at the top: --help and the subprocess helpers need no torch

    return torch.cuda.is_available()
