"""Hydra-SFT against plain SFT (and a plain reward model) at identical settings, measured.

    python benchmarks/sft_objectives.py --config recipes/configs/sft_smollm2.yaml --output_dir runs/sft-bench

Prints, from one run of each objective on the bundled demo data: held-out reward-head pair accuracy,
held-out LM perplexity on the chosen responses, and wall time; then the two targets of the Hydra-SFT issue:
reward accuracy >= 75% and Hydra-SFT perplexity within +5% of plain SFT.
"""

import argparse
import dataclasses
import json
from pathlib import Path

from trl import TrlParser

from hydra_rlhf.config import ModelConfig
from hydra_rlhf.sft import SFTConfig, run_sft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="recipes/configs/sft_smollm2.yaml")
    parser.add_argument("--output_dir", default="runs/sft-bench")
    parser.add_argument("--objectives", default="hydra,sft,reward")
    args = parser.parse_args()
    model_config, sft_config = TrlParser((ModelConfig, SFTConfig)).parse_yaml_file(args.config)
    results = {}
    for objective in args.objectives.split(","):
        config = dataclasses.replace(sft_config, sft_objective=objective, output_dir=f"{args.output_dir}/{objective}")
        summary = run_sft(model_config, config)
        results[objective] = {**summary["eval"], "wall_seconds": summary["wall_seconds"]}
    print(f"\n{'objective':10s} {'reward acc':>10s} {'perplexity':>11s} {'seconds':>8s}")
    for objective, r in results.items():
        print(f"{objective:10s} {r['reward_accuracy']:10.1%} {r['perplexity']:11.3f} {r['wall_seconds']:8.0f}")
    if "hydra" in results and "sft" in results:
        ratio = results["hydra"]["perplexity"] / results["sft"]["perplexity"]
        print(f"Hydra-SFT perplexity / plain SFT = {ratio:.4f} (target <= 1.05)")
        print(f"Hydra-SFT reward accuracy = {results['hydra']['reward_accuracy']:.1%} (target >= 75%)")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
