"""Which cards hold an 8B or 70B Hydra-PPO run on 1, 2, 4 and 8 GPUs, sharded: a markdown table made from
``hydra-rlhf estimate --gpus N --sharding fsdp2 --json`` (one call per cell; docs/sharding.md shows its output).

    python benchmarks/sharding_plan.py --output runs/sharding/plan.md

Every cell is one rank's peak (the estimate of the largest stage) and, per card, whether it fits and the largest
batch (prompts per process) that would. The run's shape is the same in every row and printed with the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = ("llama-3.1-8b", "llama-3.1-70b")
QUANTIZATIONS = ("none", "4bit")
GPU_COUNTS = (1, 2, 4, 8)
CARDS = ("RTX 4090 24GB", "L40S 48GB", "A100 80GB")  # one card of each size the table asks about
SHAPE = ["--batch-size", "4", "--max-prompt-length", "256", "--max-new-tokens", "256", "--gradient-checkpointing",
         "--all-levers"]


def estimate(model: str, quantization: str, gpus: int) -> tuple[dict | None, str]:
    """The estimate's JSON for one cell, or None and the command's one-line refusal."""
    cli = Path(sys.executable).parent / "hydra-rlhf"
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "estimate.json"
        command = [str(cli), "estimate", "--preset", model, "--quantization", quantization, "--gpus", str(gpus),
                   "--sharding", "fsdp2" if gpus > 1 else "none", *SHAPE, "--json", str(path)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            return None, done.stderr.strip().splitlines()[-1]
        return json.loads(path.read_text()), " ".join(command[1:-2]).replace(str(cli), "hydra-rlhf")


def table() -> str:
    lines = [f"Run shape (every row): hydra, ppo, `{' '.join(SHAPE)}` (batch per process), bf16 compute on CUDA.", "",
             f"| model | base | GPUs | per-rank peak | {' | '.join(CARDS)} |", "|---|---|---|---|" + "---|" * len(CARDS)]
    for model in MODELS:
        for quantization in QUANTIZATIONS:
            for gpus in GPU_COUNTS:
                result, said = estimate(model, quantization, gpus)
                base = "bf16" if quantization == "none" else quantization
                if result is None:
                    lines.append(f"| {model} | {base} | {gpus} | refused: {said.removeprefix('error: ').split(':')[0]} |"
                                 + " - |" * len(CARDS))
                    continue
                cards = {row["name"]: row for row in result["gpus"]}
                cells = [f"{'yes' if cards[c]['fits'] else 'no'} / {cards[c]['largest_batch']}" for c in CARDS]
                lines.append(f"| {model} | {base} | {gpus} | {result['peak_bytes'] / (1 << 30):.1f} GiB | "
                             f"{' | '.join(cells)} |")
    lines += ["", "Cells: fits at batch 4 / largest batch (prompts per process) that fits; 0: none does."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("runs/sharding/plan.md"))
    args = parser.parse_args()
    text = table()
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
